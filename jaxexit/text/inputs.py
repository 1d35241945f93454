"""A run's inputs: a GLUE split checked against the task the run was trained on, or own sentences."""

from __future__ import annotations

from pathlib import Path

from jaxexit.text import batches, glue
from jaxexit.text.model import EarlyExitModel
from jaxexit.training.checkpoint import RunDir


def load_inputs(run: RunDir, model: EarlyExitModel, task: glue.Task, split: str, data_dir: str | None,
                limit: int = 0, skip_bad_rows: bool = False) -> tuple[batches.EncodedSplit, list[glue.Example]]:
    """Split `split` of `task` (the first `limit` examples; 0: all), encoded for `model`. Refuses a
    data directory that holds another GLUE task than the one `run` was trained on."""
    if data_dir is not None:
        other = {t.tsv_dir.lower(): t for t in glue.TASKS.values() if t is not task}.get(Path(data_dir).name.lower())
        if other is not None:
            raise ValueError(f"the checkpoint {run.path} was trained on {task.tsv_dir}, but --data-dir {data_dir} "
                             f"holds {other.tsv_dir}")
    examples = glue.load_examples(task, split, data_dir, skip_bad_rows=skip_bad_rows)
    if limit:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"{task.tsv_dir} {split} has no examples")
    return batches.encode_examples(model.tokenizer, task, examples), examples


def text_inputs(model: EarlyExitModel, task: glue.Task, lines: list[str]) -> batches.EncodedSplit:
    """Own sentences, one per line (pairs separated by a tab for pair tasks); blank lines are skipped."""
    lines = [line for line in (x.rstrip("\n") for x in lines) if line.strip()]
    if not lines:
        raise ValueError("no input text: pass --text or lines on stdin")
    examples = []
    for i, line in enumerate(lines):
        parts = line.split("\t")
        if task.is_pair and len(parts) != 2:
            raise ValueError(f"{task.tsv_dir} takes sentence pairs: line {i + 1} needs two tab-separated parts")
        examples.append(glue.Example(i, parts[0], parts[1] if task.is_pair else None, None))
    return batches.encode_examples(model.tokenizer, task, examples)
