"""Which run a command works on: a given run directory, or the latest one (`runs/LATEST`)."""

from __future__ import annotations

from jaxexit.training.checkpoint import RunDir


def resolve_run(checkpoint: str | None, output_dir: str = "runs") -> RunDir:
    """`checkpoint`, or the most recent run of train/finetune.py under `output_dir` (its LATEST)."""
    run = RunDir(checkpoint) if checkpoint else RunDir.latest(output_dir)
    if not run.path.is_dir():
        raise FileNotFoundError(f"checkpoint {run.path} does not exist")
    if not (run.path / "train_config.json").is_file():
        raise FileNotFoundError(f"{run.path} is not a train/finetune.py run directory (no train_config.json)")
    return run
