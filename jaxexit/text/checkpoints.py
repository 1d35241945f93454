"""Which checkpoint a command works on (`--checkpoint` of `jaxexit-infer`, `-analyze`, `-serve`): a
train/finetune.py run directory (`RunDir`, or the latest under `runs/`) or an exported directory
(`ExportDir`, what `jaxexit-export` writes: docs/export.md), and its task and model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxexit.text import glue
from jaxexit.text.export import BLOCK, CONFIG, Calibration, load_pretrained, read_config, read_table
from jaxexit.text.hf_import import CheckpointError
from jaxexit.text.model import EarlyExitModel
from jaxexit.training.checkpoint import RunDir
from jaxexit.training.runs import resolve_run


class ExportDir:
    """An exported directory where `jaxexit-infer`, `-analyze` and `-serve` take a run (`--checkpoint OUT`):
    its task from the `early_exit` block, its model, its calibration table. The commands write nothing
    into it (it is what `push_to_hub` uploads): their files go to `work`, the sibling `OUT.jaxexit/`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.hf, self.block, self.config = read_config(self.path)
        where = self.path.resolve()
        self.work = where.with_name(where.name + ".jaxexit")

    def task(self) -> glue.Task:
        name = self.block.get("task")
        if name is None:
            raise ValueError(f"{self.path / CONFIG}: {BLOCK}.task is null, so the export names no task; export the "
                             "run with jaxexit-export (or save_pretrained(..., task=...))")
        try:
            return glue.get_task(name)
        except ValueError as e:
            raise CheckpointError(f"{self.path / CONFIG}: {BLOCK}.task: {e}") from None

    def train_config(self) -> dict:
        """What commands read of a run's train_config.json: the task, the export's recipe, no data."""
        return {**(self.block.get("recipe") or {}), "task": self.block.get("task"), "scheme": self.block.get("scheme"),
                "data_dir": None}

    def load_model(self) -> EarlyExitModel:
        return load_pretrained(self.path)

    def table(self) -> Calibration | None:
        return read_table(self.path)

    def table_on(self, split_name: str) -> Calibration:
        """The calibration table, which must be on `split_name` (ValueError saying what to pass if not)."""
        table = self.table()
        if table is None or table.split != split_name:
            has = ("no calibration table (it was exported with --no-table)" if table is None else
                   f"its calibration table on {table.split} only")
            tsv = self.task().tsv_dir
            raise ValueError(f"{self.path} holds {has}, not {tsv} {split_name}: pass --data-dir (the {tsv} GLUE TSV "
                             "directory)")
        return table


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is taken as an export: a `config.json` and no `train_config.json` (a run's)."""
    path = Path(path)
    return (path / CONFIG).is_file() and not (path / "train_config.json").is_file()


def resolve_checkpoint(checkpoint: str | os.PathLike | None, runs_dir: str = "runs") -> RunDir | ExportDir:
    """What `--checkpoint` names: an exported directory (`ExportDir`), else a train/finetune.py run
    (`RunDir`; None: the latest under `runs_dir`). A plain Hugging Face checkpoint is refused."""
    path = Path(checkpoint) if checkpoint else None
    if path is not None and is_export_dir(path):
        try:
            block = json.loads((path / CONFIG).read_text()).get(BLOCK)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            block = {}  # ExportDir names the problem
        if block is None:
            raise ValueError(f"{path} is a plain Hugging Face checkpoint ({CONFIG} has no {BLOCK} block), not a run "
                             f"or an export: fine-tune it first (jaxexit-finetune --model {path})")
        return ExportDir(path)
    return resolve_run(checkpoint, runs_dir)


def task_and_model(source: RunDir | ExportDir) -> tuple[glue.Task, EarlyExitModel]:
    """The task and the model of a run or an export (`resolve_checkpoint`'s answer)."""
    if isinstance(source, ExportDir):
        return source.task(), source.load_model()
    return glue.get_task(source.train_config()["task"]), EarlyExitModel.from_run(source.path)


def work_dir(source: RunDir | ExportDir) -> Path:
    """Where a command writes for `source` (a run: its directory; an export: `OUT.jaxexit/`)."""
    return source.work if isinstance(source, ExportDir) else source.path
