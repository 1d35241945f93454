"""GLUE examples from tensorflow-datasets (the online default) or a local GLUE TSV directory.

Both sources give the same examples: same text, the tfds label ids (`Task.label_names[i]` is label
`i`), the same `idx`, in `idx` order. Splits carry tfds names (`train`, `validation`, `test`; MNLI
`validation_matched`, ...); `dev`, `dev_matched`, ... are accepted as the TSV file stems.

A TSV directory has the layout the official `download_glue_data.py` writes: `<data_dir>/SST-2/dev.tsv`,
`<data_dir>/MNLI/dev_matched.tsv`, ... The TSV reader mirrors the tfds GLUE builder
(`tensorflow_datasets/text/glue.py`): tab-separated, no quoting, columns looked up by header name,
`idx` = 0-based data row, blank lines skipped. Unlike tfds it stops on a malformed row instead of
dropping it, naming the file and line; `skip_bad_rows=True` drops such rows instead and logs how many
and where (the official QQP files have a few).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Task:
    """One GLUE task: where its data lives and how its labels and metrics are named."""

    name: str                              # canonical key and tfds config name: "sst2"
    tsv_dir: str                           # directory in the GLUE download layout, also the display name
    text_features: tuple[str, ...]         # tfds feature names of text_a (and text_b)
    tsv_text_columns: tuple[str, ...]      # TSV header names of the same fields
    tsv_label_column: str
    label_names: tuple[str, ...]           # tfds ClassLabel names, index = label id; () for regression
    metric_names: tuple[str, ...]          # first one is the primary metric
    dev_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    tsv_headerless: tuple[str, ...] = ()   # column names for train/dev files written without a header

    @property
    def tfds_name(self) -> str:
        return f"glue/{self.name}"

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1

    @property
    def is_pair(self) -> bool:
        return len(self.text_features) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits, *self.test_splits)


# Label names and their order are the tfds GLUE builder's, so that label ids agree across sources.
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("cola", "CoLA", ("sentence",), ("sentence",), "label", ("unacceptable", "acceptable"), ("mcc",),
         tsv_headerless=("source", "label", "author_label", "sentence")),
    Task("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive"), ("accuracy",)),
    Task("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
         ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    Task("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", (),
         ("pearson", "spearman")),
    Task("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
         ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    Task("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
         ("entailment", "neutral", "contradiction"), ("accuracy",),
         dev_splits=("validation_matched", "validation_mismatched"),
         test_splits=("test_matched", "test_mismatched")),
    Task("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
         ("entailment", "not_entailment"), ("accuracy",)),
    Task("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
         ("entailment", "not_entailment"), ("accuracy",)),
)}

STSB_RANGE = (0.0, 5.0)
SHOWN_BAD_ROWS = 5  # file:line positions named when malformed rows are skipped

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Example:
    """One GLUE example. `label` is a class id, a float32-exact score (STS-B), or None (test splits)."""

    idx: int
    text_a: str
    text_b: str | None
    label: int | float | None


class GlueFormatError(ValueError):
    """A GLUE TSV file that does not parse; the message starts with `file:line:`."""


def get_task(name: str | Task) -> Task:
    """Looks a task up by name, ignoring case, '-', '_' and a 'glue/' prefix: "SST-2", "sst2", "glue/sst2"."""
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower().removeprefix("glue/").replace("-", "").replace("_", "")
    if key not in TASKS:
        known = ", ".join(f"{t.name} ({t.tsv_dir})" for t in TASKS.values())
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {known}")
    return TASKS[key]


def canonical_split(task: str | Task, split: str) -> str:
    """Maps a split name to its tfds name ("dev" -> "validation"), checking it exists for the task."""
    task = get_task(task)
    name = split.strip().lower()
    if name == "dev" or name.startswith("dev_"):
        name = "validation" + name[3:]
    if name not in task.splits:
        raise ValueError(f"{task.tsv_dir} has no split {split!r}; its splits are {', '.join(task.splits)}")
    return name


def resolve_splits(task: str | Task, split: str) -> tuple[str, ...]:
    """The splits a name stands for: `dev` (or `validation`) is every dev split of the task and
    `test` every test split (MNLI: matched and mismatched, reported side by side as GLUE does);
    any other name is one split (`dev_matched`, `validation_mismatched`, `train`, ...)."""
    task = get_task(task)
    name = split.strip().lower()
    if name in ("dev", "validation"):
        return task.dev_splits
    if name == "test":
        return task.test_splits
    return (canonical_split(task, split),)


def tsv_path(data_dir: str | Path, task: str | Task, split: str) -> Path:
    """The file the official download script writes for `split`: validation -> dev.tsv, ...

    `data_dir` is the root of a GLUE download (holding `SST-2/`, ...) or the task's own directory
    (`.../glue/SST-2`, recognised by holding the task's `*.tsv` files and no `SST-2/` inside).
    """
    task = get_task(task)
    split = canonical_split(task, split)
    stem = "dev" + split[len("validation"):] if split.startswith("validation") else split
    root = Path(data_dir)
    task_dir = root / task.tsv_dir
    if not task_dir.is_dir() and any(root.glob("*.tsv")):
        task_dir = root
    return task_dir / f"{stem}.tsv"


def load_examples(task: str | Task, split: str, data_dir: str | Path | None = None, *,
                  tfds_data_dir: str | Path | None = None, download: bool = True,
                  skip_bad_rows: bool = False) -> list[Example]:
    """All examples of one split, sorted by `idx`.

    `data_dir=None` reads `glue/<task>` through tensorflow-datasets (downloading and preparing it
    under `tfds_data_dir`, default ~/tensorflow_datasets, unless `download=False`); otherwise
    `data_dir` is the root of a GLUE TSV download holding `<TASK>/<split>.tsv`, or that task directory.
    A malformed TSV row raises `GlueFormatError` (file:line and what is wrong) unless
    `skip_bad_rows`, which drops it and logs a warning with the count and the first positions.
    """
    task = get_task(task)
    split = canonical_split(task, split)
    if data_dir is None:
        return _load_tfds(task, split, tfds_data_dir, download)
    return _load_tsv(task, split, Path(data_dir), skip_bad_rows)


def labels_array(task: str | Task, examples: list[Example]) -> np.ndarray:
    """Labels as int32 class ids or float32 scores; refuses unlabeled (test) examples."""
    task = get_task(task)
    missing = [ex.idx for ex in examples if ex.label is None]
    if missing:
        raise ValueError(f"{len(missing)} {task.tsv_dir} examples have no label (idx {missing[:5]}...); "
                         "test splits are for prediction only")
    return np.asarray([ex.label for ex in examples], np.float32 if task.is_regression else np.int32)


# ---------------------------------------------------------------------------------------------------
# tensorflow-datasets

def _load_tfds(task: Task, split: str, tfds_data_dir, download: bool) -> list[Example]:
    try:
        import tensorflow_datasets as tfds
        # Registers the GLUE builder alone: importing all of tfds' text datasets needs TensorFlow.
        import tensorflow_datasets.text.glue  # noqa: F401
    except ImportError as e:
        raise ImportError(f"reading {task.tfds_name} needs tensorflow-datasets (pip install tensorflow-datasets); "
                          f"or pass data_dir=<GLUE TSV directory>: {e}") from e
    # array_record + data_source reads without TensorFlow (tfds.load would need it).
    # A data_dir already prepared as tfrecord by tfds.load makes tfds refuse this, saying so.
    try:
        source = tfds.data_source(task.tfds_name, split=split, download=download,
                                  data_dir=None if tfds_data_dir is None else str(tfds_data_dir),
                                  builder_kwargs={"file_format": "array_record"})
    except Exception as e:  # no network, a broken download, a data_dir prepared in another format
        detail = " ".join(str(e).split("\n")[0].split())[:300]
        raise OSError(f"cannot read {task.tfds_name} through tensorflow-datasets ({type(e).__name__}: {detail}); "
                      f"offline, pass a local GLUE TSV directory instead (--data-dir DIR, holding "
                      f"{task.tsv_dir}/)") from e
    examples = [_from_tfds(task, record) for record in _iterate(source)]
    examples.sort(key=lambda ex: ex.idx)  # tfds stores examples shuffled by key
    return examples


def _iterate(source):
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            return getitems(range(len(source)))  # one batched read: ~5x faster than item by item
        except TypeError:  # tfds.testing.mock_data's stand-in reader has no batched read
            pass
    return [source[i] for i in range(len(source))]


def _from_tfds(task: Task, record: dict) -> Example:
    texts = [_text(record[f]) for f in task.text_features]
    label = record["label"]
    if task.is_regression:
        label = float(np.float32(label))
        label = None if label == -1.0 else label
    else:
        label = int(label)
        label = None if label == -1 else label  # tfds' "no label" on test splits
    return Example(int(record["idx"]), texts[0], texts[1] if task.is_pair else None, label)


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------------
# GLUE TSV files

def _load_tsv(task: Task, split: str, data_dir: Path, skip_bad_rows: bool = False) -> list[Example]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"GLUE data directory not found: {data_dir} (expected the root of a GLUE "
                                f"download, holding {task.tsv_dir}/ and the other task directories)")
    path = tsv_path(data_dir, task, split)
    if not path.is_file():
        why = "" if path.parent.is_dir() else f" (no {task.tsv_dir} directory in {data_dir})"
        raise FileNotFoundError(f"{task.tsv_dir} {split} file not found: expected {path}{why}")
    header = task.tsv_headerless if task.tsv_headerless and not split.startswith("test") else None
    bad: list[tuple[int, GlueFormatError]] | None = [] if skip_bad_rows else None
    header, rows = read_tsv(path, header, bad)
    text_cols = [_column(path, header, name) for name in task.tsv_text_columns]
    label_col = header.index(task.tsv_label_column) if task.tsv_label_column in header else None
    parsed = []
    for line, fields in rows:
        try:
            label = None if label_col is None else _parse_label(task, fields[label_col], path, line)
        except GlueFormatError as e:
            if bad is None:
                raise
            bad.append((line, e))
            continue
        parsed.append((line, fields, label))
    idxs = list(range(len(parsed)))
    if task.name == "mrpc" and split in ("train", "validation"):
        idxs = _mrpc_source_rows(path, split, [(f[1], f[2]) for _, f, _ in parsed]) or idxs
    if bad:
        shown = "; ".join(str(e) for _, e in sorted(bad, key=lambda b: b[0])[:SHOWN_BAD_ROWS])
        log.warning("skipped %d malformed row%s of %s (%s%s)", len(bad), "s" * (len(bad) > 1), path, shown,
                    "; ..." if len(bad) > SHOWN_BAD_ROWS else "")
    examples = []
    for idx, (line, fields, label) in zip(idxs, parsed):
        texts = [fields[c] for c in text_cols]
        examples.append(Example(idx, texts[0], texts[1] if task.is_pair else None, label))
    return examples


def read_tsv(path: Path, header: tuple[str, ...] | None = None, bad_rows: list | None = None
             ) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and `(line_number, fields)` rows of a tab-separated file without quoting.

    The header is the first line unless given (for files written without one). A UTF-8 BOM is
    dropped (MRPC), blank lines are skipped as csv.DictReader does, and every row must have as many
    fields as the header: a row that has not raises `GlueFormatError`, or, given a `bad_rows`
    list, is left out and `(line_number, error)` appended there.
    """
    rows = []
    with open(path, encoding="utf-8-sig") as f:  # text mode: universal newlines, as tfds reads
        for line_number, line in enumerate(f, start=1):
            fields = line.rstrip("\n").split("\t")
            if fields == [""]:
                continue
            if header is None:
                header = fields
                continue
            if len(fields) != len(header):
                error = GlueFormatError(f"{path}:{line_number}: expected {len(header)} tab-separated fields "
                                        f"({', '.join(header)}), found {len(fields)}")
                if bad_rows is None:
                    raise error
                bad_rows.append((line_number, error))
                continue
            rows.append((line_number, fields))
    if header is None:
        raise GlueFormatError(f"{path}:1: empty file, expected a header line")
    return list(header), rows


def _column(path: Path, header: list[str], name: str) -> int:
    if name not in header:
        raise GlueFormatError(f"{path}:1: no column {name!r} in header ({', '.join(header)})")
    return header.index(name)


def _parse_label(task: Task, text: str, path: Path, line: int) -> int | float:
    if task.is_regression:
        try:
            score = float(np.float32(text))  # float32 as tfds stores it, so both sources agree exactly
        except ValueError:
            raise GlueFormatError(f"{path}:{line}: score {text!r} is not a number") from None
        low, high = STSB_RANGE
        if math.isnan(score) or not low <= score <= high:
            raise GlueFormatError(f"{path}:{line}: score {text!r} is outside [{low:g}, {high:g}]")
        return score
    # As tfds: a class name, or its index written as an integer ("0"/"1" in CoLA, SST-2, MRPC, QQP).
    if text in task.label_names:
        return task.label_names.index(text)
    if text.isascii() and text.isdigit() and int(text) < task.num_labels:
        return int(text)
    raise GlueFormatError(f"{path}:{line}: unknown {task.tsv_dir} label {text!r}; expected one of "
                          f"{', '.join(task.label_names)} or 0..{task.num_labels - 1}")


def _mrpc_source_rows(path: Path, split: str, pair_ids: list[tuple[str, str]]) -> list[int] | None:
    """tfds numbers MRPC train/dev examples by their row in msr_paraphrase_train.txt, which the
    download script splits into train.tsv and dev.tsv by dev_ids.tsv, keeping the order. When those
    two source files sit beside the TSVs, returns the same numbers; None when they are absent."""
    source, dev_ids = path.parent / "msr_paraphrase_train.txt", path.parent / "dev_ids.tsv"
    if not (source.is_file() and dev_ids.is_file()):
        return None
    _, id_rows = read_tsv(dev_ids, header=("id1", "id2"))
    dev = {tuple(fields) for _, fields in id_rows}
    _, source_rows = read_tsv(source)
    want_dev = split == "validation"
    picked = [(n, (f[1], f[2])) for n, (_, f) in enumerate(source_rows) if ((f[1], f[2]) in dev) == want_dev]
    if [ids for _, ids in picked] != pair_ids:
        raise GlueFormatError(f"{path}:1: rows do not follow {source.name} split by {dev_ids.name} "
                              "(as the download script writes them); cannot number them as tfds does")
    return [n for n, _ in picked]
