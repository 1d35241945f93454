"""`jaxexit-export RUN OUT` (`infer/export.py`): a fine-tuned run as a Hugging Face checkpoint directory
(`jaxexit.text.export`, docs/export.md): transformers' names for the backbone and final ramp, every ramp
under `early_exit.*`, the tokenizer, the calibration table on the labelled dev split, a model card.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jaxexit.cli import console
from jaxexit.exits import runners
from jaxexit.text import export, glue
from jaxexit.text.inputs import load_inputs
from jaxexit.text.model import EarlyExitModel
from jaxexit.training.runs import resolve_run

log = logging.getLogger("jaxexit.export")

_USAGE = """Export a fine-tuned run as a Hugging Face checkpoint directory.

    python infer/export.py runs/sst2-joint exported/sst2-joint          # weights, config, tokenizer, table, card
    python infer/export.py runs/sst2-joint OUT --no-table                # without the dev-split calibration table
    python infer/export.py runs/sst2-joint OUT --push-to-hub me/sst2-early-exit

Load it back with EarlyExitModel.from_pretrained(OUT) (every ramp, exactly), or in PyTorch with
transformers.AutoModelForSequenceClassification.from_pretrained(OUT) (first-token runs: the full model).
jaxexit-serve, jaxexit-infer and jaxexit-analyze take OUT wherever they take a run (--checkpoint OUT):
the service starts from OUT alone, its calibration table standing in for the dev data. OUT/README.md is
the model card: per-ramp scores, the offline trade-off, certified settings and tradeoff.png.
"""

# The recipe fields of train_config.json the export records.
RECIPE = ("model", "scheme", "epochs", "stage2_epochs", "lr", "stage2_lr", "batch_size", "max_length", "seed",
          "max_train_examples")


def build_parser() -> argparse.ArgumentParser:
    p = console.Parser(prog="jaxexit-export", description=_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a train/finetune.py run directory")
    p.add_argument("out", help="the directory to write (an earlier export there is replaced)")
    p.add_argument("--no-table", action="store_true",
                   help="no calibration table (default: every ramp's outputs on the labelled dev split, when the "
                        "run's data directory or --data-dir is there)")
    p.add_argument("--data-dir", help="GLUE data for the table (default: the run's)")
    p.add_argument("--limit", type=int, default=0, help="the table on the first N dev examples only (0: all)")
    p.add_argument("--batch-size", type=int, default=64, help="batch of the table's offline pass (default 64)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the directory to this Hugging Face Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return p


def table(run, model: EarlyExitModel, task: glue.Task, data_dir: str | None, limit: int, batch_size: int):
    """The calibration table on the task's (first) dev split, or None when its data is not there."""
    if data_dir is None or not Path(data_dir).exists():
        log.warning("no calibration table: the run's data directory %s is not there (pass --data-dir, or "
                    "--no-table)", data_dir)
        return None
    split_name = task.dev_splits[0]
    split, _ = load_inputs(run, model, task, split_name, data_dir, limit)
    if not split.labelled:
        raise ValueError(f"{task.tsv_dir} {split_name} has no labels: the calibration table needs them")
    log.info("calibration table: ramp outputs on %s %s (%d inputs) ...", task.tsv_dir, split_name, len(split))
    return export.Calibration(runners.cached_logits(model, split, batch_size), split.labels, split_name)


def _run(args) -> Path:
    if args.limit < 0 or args.batch_size < 1:
        raise ValueError("--limit must be >= 0 and --batch-size >= 1")
    run = resolve_run(args.run)
    train_cfg = run.train_config()
    task = glue.get_task(train_cfg["task"])
    model = EarlyExitModel.from_run(run.path)
    calibration = None if args.no_table else table(
        run, model, task, args.data_dir or train_cfg.get("data_dir"), args.limit, args.batch_size)
    extra = {"scheme": train_cfg.get("scheme"), "run": run.path.name,
             "recipe": {k: train_cfg[k] for k in RECIPE if k in train_cfg}}
    out = model.save_pretrained(args.out, task=task, calibration=calibration, extra=extra)
    print(f"exported {run.path} -> {out}" + ("" if calibration is None else
                                             f" (calibration table: {len(calibration.labels)} inputs)"))
    print(f"model card: {out / export.CARD}" + (f", {out / export.PLOT}" if (out / export.PLOT).is_file() else ""))
    if args.push_to_hub:
        print(f"uploaded to {export.push_to_hub(out, args.push_to_hub, private=args.private)}")
    return out


def run(argv=None) -> Path | None:
    """The command on `argv`; the exported directory. A user error ends it with `error: ...`, status 2."""
    args = build_parser().parse_args(argv)
    console.setup(keep_for_file=False)
    try:
        return _run(args)
    except console.USER_ERRORS as e:
        console.fail(str(e), e)


def main(argv=None) -> None:
    """The console script `jaxexit-export`."""
    run(argv)
