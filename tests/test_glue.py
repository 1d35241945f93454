"""GLUE data: the task table, the TSV reader on real and synthetic files, the tfds path, and their agreement."""

import collections
import logging
import re
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from jaxexit.text import glue
from jaxexit.text.glue import Example, GlueFormatError, get_task, load_examples

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "glue"
SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

needs_shared = pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason=f"real GLUE files not found at {SHARED_GLUE}")


def _tfds():
    try:
        import tensorflow_datasets as tfds
        import tensorflow_datasets.text.glue  # noqa: F401
    except ImportError as e:
        pytest.skip(f"tensorflow-datasets not importable: {e}")
    return tfds


# --- task table and names --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sst2", "SST-2", "sst-2", "Sst_2", " glue/sst2 "])
def test_get_task_accepts_common_spellings(name):
    assert get_task(name).name == "sst2"


def test_get_task_unknown_lists_known_tasks():
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst5'.*cola \(CoLA\).*sst2 \(SST-2\).*rte \(RTE\)"):
        get_task("sst5")


def test_task_table_follows_tfds_label_conventions():
    expect = {
        "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
        "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
        "mnli": ("entailment", "neutral", "contradiction"),
        "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"), "stsb": (),
    }
    assert {t.name: t.label_names for t in glue.TASKS.values()} == expect
    assert [t.name for t in glue.TASKS.values() if t.is_regression] == ["stsb"]
    assert get_task("stsb").num_labels == 1 and get_task("mnli").num_labels == 3 and get_task("rte").num_labels == 2
    assert get_task("mnli").dev_splits == ("validation_matched", "validation_mismatched")
    assert get_task("sst2").tfds_name == "glue/sst2" and not get_task("sst2").is_pair and get_task("qqp").is_pair


def test_task_table_matches_installed_tfds_builder():
    _tfds()
    from tensorflow_datasets.text.glue import Glue

    configs = {c.name: c for c in Glue.BUILDER_CONFIGS}
    for task in glue.TASKS.values():
        config = configs[task.name]
        assert tuple(config.label_classes or ()) == task.label_names, task.name
        assert tuple(config.text_features) == task.text_features, task.name
        assert config.data_dir == task.tsv_dir, task.name
        if task.name not in ("mrpc", "cola"):  # tfds reads MRPC from its sources, CoLA by position
            assert tuple(config.text_features.values()) == task.tsv_text_columns, task.name
            assert config.label_column == task.tsv_label_column, task.name


def test_splits_and_tsv_paths():
    assert glue.canonical_split("sst2", "dev") == "validation"
    assert glue.canonical_split("MNLI", "dev_mismatched") == "validation_mismatched"
    assert glue.tsv_path("/g", "mnli", "validation_matched") == Path("/g/MNLI/dev_matched.tsv")
    assert glue.tsv_path("/g", "mnli", "test_mismatched") == Path("/g/MNLI/test_mismatched.tsv")
    assert glue.tsv_path("/g", "sts-b", "validation") == Path("/g/STS-B/dev.tsv")
    with pytest.raises(ValueError, match="MNLI has no split 'validation'.*validation_matched"):
        glue.canonical_split("mnli", "validation")
    with pytest.raises(ValueError, match="SST-2 has no split 'valid'"):
        load_examples("sst2", "valid", FIXTURES)


# --- real GLUE files -------------------------------------------------------------------------------

REAL = [  # task, split, rows (MANIFEST.md), label counts by id (None: unlabeled)
    ("sst2", "train", 67349, {0: 29780, 1: 37569}),
    ("sst2", "validation", 872, {0: 428, 1: 444}),
    ("sst2", "test", 1821, {None: 1821}),
    ("cola", "train", 8551, {0: 2528, 1: 6023}),
    ("cola", "validation", 1043, {0: 322, 1: 721}),
    ("cola", "test", 1063, {None: 1063}),
    ("mrpc", "train", 3668, {0: 1194, 1: 2474}),
    ("mrpc", "validation", 408, {0: 129, 1: 279}),
    ("mrpc", "test", 1725, {None: 1725}),
    ("stsb", "train", 5749, None),
    ("stsb", "validation", 1500, None),
    ("stsb", "test", 1379, {None: 1379}),
    ("qnli", "validation", 5463, {0: 2702, 1: 2761}),
    ("qnli", "test", 5463, {None: 5463}),
]


@needs_shared
@pytest.mark.parametrize("task, split, rows, counts", REAL)
def test_real_files_row_counts_and_labels(task, split, rows, counts):
    examples = load_examples(task, split, SHARED_GLUE)
    assert len(examples) == rows
    idxs = [ex.idx for ex in examples]
    assert idxs == sorted(set(idxs))
    if task != "mrpc" or split == "test":  # MRPC train/dev idx are rows of the SentEval source
        assert idxs == list(range(rows))
    if counts is not None:
        assert dict(collections.Counter(ex.label for ex in examples)) == counts
    else:
        scores = np.array([ex.label for ex in examples])
        assert scores.min() == 0.0 and scores.max() == 5.0
    pair = get_task(task).is_pair
    assert all(isinstance(ex.text_a, str) and ex.text_a for ex in examples)
    assert all((ex.text_b is not None) == pair for ex in examples)


@needs_shared
def test_real_files_first_rows():
    assert load_examples("sst2", "dev", SHARED_GLUE)[0] == Example(
        0, "it 's a charming and often affecting journey . ", None, 1)
    assert load_examples("cola", "dev", SHARED_GLUE)[0] == Example(
        0, "The sailors rode the breeze clear of the rocks.", None, 1)
    mrpc = load_examples("mrpc", "dev", SHARED_GLUE)[0]  # the header's BOM must not hide "Quality"
    assert mrpc.label == 1 and mrpc.text_a.startswith("He said the foodservice pie business doesn 't fit")
    stsb = load_examples("stsb", "dev", SHARED_GLUE)[:2]
    assert [ex.label for ex in stsb] == [5.0, 4.75] and stsb[0].text_b == "A man wearing a hard hat is dancing."
    qnli = load_examples("qnli", "dev", SHARED_GLUE)[:2]
    assert [ex.label for ex in qnli] == [0, 1]  # entailment, not_entailment
    assert qnli[0].text_a == "What came into force after the new constitution was herald?"


@needs_shared
def test_real_test_idx_is_the_index_column():
    for task in ("sst2", "cola", "mrpc", "stsb", "qnli"):
        path = glue.tsv_path(SHARED_GLUE, task, "test")
        header, rows = glue.read_tsv(path)
        assert header[0] == "index"
        assert [ex.idx for ex in load_examples(task, "test", SHARED_GLUE)] == [int(f[0]) for _, f in rows]


@needs_shared
def test_real_mrpc_idx_points_into_senteval_source():
    _, source = glue.read_tsv(SHARED_GLUE / "MRPC" / "msr_paraphrase_train.txt")
    train = load_examples("mrpc", "train", SHARED_GLUE)
    dev = load_examples("mrpc", "dev", SHARED_GLUE)
    assert sorted(ex.idx for ex in train + dev) == list(range(len(source)))
    for ex in train[:50] + dev:
        fields = source[ex.idx][1]
        assert (int(fields[0]), fields[3], fields[4]) == (ex.label, ex.text_a, ex.text_b)


# --- fixture directory (QQP, MNLI, RTE have no real files here) --------------------------------------

def test_fixture_qqp():
    assert load_examples("qqp", "validation", FIXTURES)[2] == Example(
        2, "Is there a reason why we should travel alone?", "What are some reasons to travel alone?", 1)
    assert [ex.label for ex in load_examples("qqp", "train", FIXTURES)] == [0, 1, 0]
    assert [ex.label for ex in load_examples("qqp", "test", FIXTURES)] == [None, None]


def test_fixture_mnli_all_splits():
    assert [ex.label for ex in load_examples("mnli", "train", FIXTURES)] == [1, 0, 0, 2]
    matched = load_examples("mnli", "dev_matched", FIXTURES)
    assert [ex.label for ex in matched] == [1, 2, 0]  # gold_label, not label1
    assert matched[0].text_a == "The new rights are nice enough"
    assert matched[0].text_b == "Everyone really likes the newest benefits "
    assert [ex.label for ex in load_examples("mnli", "validation_mismatched", FIXTURES)] == [2, 2]
    for split in ("test_matched", "test_mismatched"):
        assert [(ex.idx, ex.label) for ex in load_examples("mnli", split, FIXTURES)] == [(0, None)]


def test_fixture_rte_and_quotes_kept_literally():
    assert [ex.label for ex in load_examples("rte", "train", FIXTURES)] == [1, 0, 0]
    assert [ex.label for ex in load_examples("rte", "dev", FIXTURES)] == [1, 0]
    assert load_examples("sst2", "test", FIXTURES)[1].text_a == 'a "funny" movie that is n\'t .'
    assert load_examples("mrpc", "train", FIXTURES)[0].text_a.count('"') == 2


def test_fixture_cola_headerless_train_and_headed_test():
    train = load_examples("cola", "train", FIXTURES)
    assert [ex.label for ex in train] == [1, 0, 1, 0] and train[1].text_a == "They drank the pub."
    assert load_examples("cola", "test", FIXTURES)[0] == Example(0, "Bill whistled past the house.", None, None)


def test_labels_array():
    assert glue.labels_array("stsb", load_examples("stsb", "dev", FIXTURES)).dtype == np.float32
    labels = glue.labels_array("mnli", load_examples("mnli", "dev_matched", FIXTURES))
    assert labels.dtype == np.int32 and labels.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="no label"):
        glue.labels_array("rte", load_examples("rte", "test", FIXTURES))


# --- malformed files ----------------------------------------------------------------------------------

def _glue_dir(tmp_path, task_dir, name, text):
    (tmp_path / task_dir).mkdir(exist_ok=True)
    path = tmp_path / task_dir / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("task, task_dir, name, text, line, problem", [
    ("rte", "RTE", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", 3,
     "expected 4 tab-separated fields"),
    ("qqp", "QQP", "train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\ta\tb\t0\n"
     "1\t3\t4\ta\tb\t0\textra\n", 3, "found 7"),
    ("cola", "CoLA", "train.tsv", "gj04\t1\t\tFine.\ngj04\t1\tBroken.\n", 2, "expected 4"),
    ("mnli", "MNLI", "dev_matched.tsv", "sentence1\tsentence2\tgold_label\na\tb\tneutral\na\tb\t-\n", 3,
     "unknown MNLI label '-'"),
    ("qnli", "QNLI", "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tq\ts\tentailed\n", 2, "unknown QNLI label"),
    ("sst2", "SST-2", "train.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n", 3, "unknown SST-2 label '2'"),
    ("stsb", "STS-B", "dev.tsv", "sentence1\tsentence2\tscore\na\tb\t4.0\na\tb\tfour\n", 3, "score 'four' is not a number"),
    ("stsb", "STS-B", "dev.tsv", "sentence1\tsentence2\tscore\na\tb\t5.5\n", 2, r"outside \[0, 5\]"),
    ("stsb", "STS-B", "dev.tsv", "sentence1\tsentence2\tscore\na\tb\tnan\n", 2, "outside"),
    ("rte", "RTE", "dev.tsv", "index\tpremise\thypothesis\tlabel\n", 1, "no column 'sentence1'"),
    ("rte", "RTE", "dev.tsv", "", 1, "empty file"),
])
def test_bad_rows_name_file_and_line(tmp_path, task, task_dir, name, text, line, problem):
    path = _glue_dir(tmp_path, task_dir, name, text)
    with pytest.raises(GlueFormatError, match=re.escape(f"{path}:{line}: ") + ".*" + problem):
        load_examples(task, name.removesuffix(".tsv"), tmp_path)


def test_skip_bad_rows_drops_them_and_reports_count_and_positions(tmp_path, caplog):
    rows = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
    for i in range(9):
        rows.append(f"{i}\t1\t2\tq{i}\tp{i}\t{i % 2}")
        if i in (2, 4, 5, 6, 7, 8):  # six bad rows: short, long, a bad label
            rows.append({2: "x\t1\tshort", 4: "y\t1\t2\ta\tb\t0\tlong", 5: "z\t1\t2\ta\tb\tmaybe"}.get(i, "w\t1"))
    path = _glue_dir(tmp_path, "QQP", "train.tsv", "\n".join(rows) + "\n")
    with pytest.raises(GlueFormatError, match=re.escape(f"{path}:5: ")):  # the default still stops, at the first
        load_examples("qqp", "train", tmp_path)
    with caplog.at_level(logging.WARNING, logger="jaxexit.text.glue"):
        examples = load_examples("qqp", "train", tmp_path, skip_bad_rows=True)
    assert [ex.text_a for ex in examples] == [f"q{i}" for i in range(9)] and [ex.idx for ex in examples] == list(range(9))
    (record,) = [r for r in caplog.records if "malformed" in r.getMessage()]
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "skipped 6 malformed rows of" in message
    for line in (5, 8, 10, 12, 14):  # the first five positions are named ...
        assert f"{path}:{line}: " in message
    assert f"{path}:16:" not in message and message.endswith("; ...)")  # ... and the rest counted
    assert "unknown QQP label 'maybe'" in message and "found 3" in message


def test_unreachable_tfds_is_one_clear_error():
    import tensorflow_datasets as tfds

    with mock.patch.object(tfds, "data_source", side_effect=ConnectionError("Failed to resolve 'x'\nmore")):
        with pytest.raises(OSError, match=r"cannot read glue/sst2 through tensorflow-datasets \(ConnectionError: "
                                          r"Failed to resolve 'x'\); offline, pass a local GLUE TSV directory"):
            load_examples("sst2", "dev")


def test_dev_means_every_dev_split():
    assert glue.resolve_splits("mnli", "dev") == ("validation_matched", "validation_mismatched")
    assert glue.resolve_splits("mnli", "test") == ("test_matched", "test_mismatched")
    assert glue.resolve_splits("mnli", "dev_mismatched") == ("validation_mismatched",)
    assert glue.resolve_splits("sst2", "dev") == glue.resolve_splits("sst2", "validation") == ("validation",)
    with pytest.raises(ValueError, match="no split 'devv'"):
        glue.resolve_splits("sst2", "devv")


def test_blank_lines_and_crlf_are_tolerated(tmp_path):
    _glue_dir(tmp_path, "RTE", "dev.tsv", "index\tsentence1\tsentence2\tlabel\r\n0\ta\tb\tentailment\r\n\r\n"
              "1\tc\td\tnot_entailment\r\n\n")
    assert load_examples("rte", "dev", tmp_path) == [Example(0, "a", "b", 0), Example(1, "c", "d", 1)]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="GLUE data directory not found: .*nowhere"):
        load_examples("sst2", "dev", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "QQP" / "dev.tsv")) + r" \(no QQP directory"):
        load_examples("qqp", "dev", tmp_path)
    (tmp_path / "MNLI").mkdir()
    with pytest.raises(FileNotFoundError, match="MNLI validation_mismatched file not found: expected .*dev_mismatched.tsv$"):
        load_examples("mnli", "dev_mismatched", tmp_path)


def test_mrpc_tsvs_that_do_not_follow_the_source_are_refused(tmp_path):
    shutil.copytree(FIXTURES / "MRPC", tmp_path / "MRPC")
    dev = tmp_path / "MRPC" / "dev.tsv"
    lines = dev.read_text(encoding="utf-8").splitlines(keepends=True)
    dev.write_text(lines[0] + "".join(reversed(lines[1:])), encoding="utf-8")
    with pytest.raises(GlueFormatError, match="do not follow msr_paraphrase_train.txt"):
        load_examples("mrpc", "dev", tmp_path)
    (tmp_path / "MRPC" / "msr_paraphrase_train.txt").unlink()  # without the source: plain row numbers
    assert [ex.idx for ex in load_examples("mrpc", "dev", tmp_path)] == [0, 1]


# --- tensorflow-datasets -------------------------------------------------------------------------------

def test_tfds_mock_data_gives_examples():
    tfds = _tfds()
    with tfds.testing.mock_data(num_examples=6):
        examples = load_examples("SST-2", "validation")
        pairs = load_examples("mnli", "validation_mismatched")
    assert len(examples) == 6 and all(ex.label in (0, 1) and ex.text_b is None for ex in examples)
    assert [ex.idx for ex in examples] == sorted(ex.idx for ex in examples)
    assert all(isinstance(ex.text_a, str) and isinstance(ex.text_b, str) for ex in pairs)
    assert all(ex.label in (0, 1, 2) for ex in pairs)


def test_tfds_records_are_converted_like_tsv_rows():
    tfds = _tfds()
    records = {  # as tfds.data_source returns them: shuffled, bytes, numpy scalars, -1 for no label
        ("stsb", "validation"): [
            {"idx": np.int32(1), "sentence1": b"c", "sentence2": b"d", "label": np.float32(3.8)},
            {"idx": np.int32(0), "sentence1": "a\u00e9", "sentence2": b"b", "label": np.float32(5.0)}],
        ("stsb", "test"): [{"idx": np.int32(0), "sentence1": b"a", "sentence2": b"b", "label": np.float32(-1)}],
        ("mnli", "test_matched"): [{"idx": np.int32(0), "premise": b"p", "hypothesis": b"h", "label": np.int64(-1)}],
    }

    def as_data_source(builder, split, **kwargs):
        return records[builder.builder_config.name, str(split)]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        assert load_examples("stsb", "dev") == [Example(0, "a\u00e9", "b", 5.0),
                                                Example(1, "c", "d", float(np.float32(3.8)))]
        assert load_examples("stsb", "test") == [Example(0, "a", "b", None)]
        assert load_examples("mnli", "test_matched") == [Example(0, "p", "h", None)]


def _prepare_with_tfds_builder(tfds, task, glue_dir, tfds_dir):
    """Runs tfds' own GLUE builder on local files by answering its downloads with them."""
    pytest.importorskip("importlib_resources", reason="tfds' builder needs importlib_resources to prepare data")
    mrpc_sources = {"dev_ids": "dev_ids.tsv", "train": "msr_paraphrase_train.txt", "test": "msr_paraphrase_test.txt"}
    manager = tfds.download.DownloadManager
    with mock.patch.object(manager, "download_and_extract", lambda self, url: str(glue_dir)), \
            mock.patch.object(manager, "download", lambda self, urls: {
                k: str(glue_dir / "MRPC" / name) for k, name in mrpc_sources.items()}):
        builder = tfds.builder(task.tfds_name, data_dir=str(tfds_dir), file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _assert_sources_agree(tfds, task, glue_dir, tfds_dir):
    _prepare_with_tfds_builder(tfds, task, glue_dir, tfds_dir)
    for split in task.splits:
        from_tfds = load_examples(task, split, tfds_data_dir=tfds_dir, download=False)
        from_tsv = load_examples(task, split, glue_dir)
        assert from_tsv, (task.name, split)
        assert from_tfds == from_tsv, (task.name, split)


@pytest.mark.parametrize("task", list(glue.TASKS))
def test_tfds_builder_and_tsv_reader_agree_on_fixtures(tmp_path, task):
    _assert_sources_agree(_tfds(), get_task(task), FIXTURES, tmp_path)


@needs_shared
@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb", "qnli"])
def test_tfds_builder_and_tsv_reader_agree_on_real_files(tmp_path, task):
    task = get_task(task)
    glue_dir = tmp_path / "glue"
    shutil.copytree(SHARED_GLUE / task.tsv_dir, glue_dir / task.tsv_dir)
    files = glue_dir / task.tsv_dir
    if not (files / "train.tsv").exists():  # QNLI's train is not in shared/: any rows will do
        shutil.copy(files / "dev.tsv", files / "train.tsv")
    for name in ("train.tsv", "test.tsv"):  # keep it quick: the dev split is compared whole
        if task.name != "mrpc":  # tfds reads MRPC from its SentEval sources instead
            lines = (files / name).read_text(encoding="utf-8").splitlines(keepends=True)
            (files / name).write_text("".join(lines[:300]), encoding="utf-8")
    _assert_sources_agree(_tfds(), task, glue_dir, tmp_path / "tfds")


def test_encoded_split_take_and_labelled():
    from jaxexit.text import metrics
    from jaxexit.text.batches import EncodedSplit

    split = EncodedSplit([[1], [2, 3], [4]], [[0], [0, 0], [0]], np.array([1, 0, 1], np.int32), np.array([7, 8, 9]))
    part = split.take([2, 0])
    assert part.rows == [[4], [1]] and part.idx.tolist() == [9, 7] and part.labels.tolist() == [1, 1]
    assert split.labelled
    assert not EncodedSplit([[1]], [[0]], np.array([-1], np.int32), np.array([0])).labelled
    assert not EncodedSplit([[1]], [[0]], np.array([np.nan], np.float32), np.array([0])).labelled
    score = metrics.primary_scorer("mrpc")  # F1 of class 1
    assert score(np.array([1, 1, 0]), np.array([1, 0, 0])) == pytest.approx(metrics.f1([1, 1, 0], [1, 0, 0]))
