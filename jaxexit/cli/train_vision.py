"""Train a multi-exit ResNet (an exit after every residual block) on CIFAR: PCEE-BERT section 4.6.4.

    python train/train_vision.py --config cifar10 --data-dir /tmp/cifar10     # image folder {train,test}/<class>/*
    python train/train_vision.py --config cifar100                            # tensorflow-datasets (online)
    python train/train_vision.py --config cifar10 --epochs 164 --schedule step   # He et al.'s full recipe
    python train/train_vision.py --resume runs/cifar10-resnet56-20261121-101500

The console script `jaxexit-train-vision` is the same command.
"""

from __future__ import annotations

import argparse

from jaxexit.cli import console, flags
from jaxexit.vision.config import PRESETS, VisionTrainConfig, preset
from jaxexit.vision.train import TrainResult, format_table, train


def build_parser() -> argparse.ArgumentParser:
    """`--config PRESET` plus one `--field-name VALUE` per VisionTrainConfig field but `dataset`,
    and the run's own switches."""
    parser = console.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, metavar="PRESET",
                        help=f"dataset preset: {', '.join(PRESETS)} (default: cifar10)")
    flags.add_field_arguments(parser, VisionTrainConfig, skip="dataset")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (its saved settings)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--results-dir", metavar="DIR",
                        help="also copy summary.json, layers.csv, metrics.jsonl and train_config.json to DIR/<run name>/")
    return parser


def config(args: argparse.Namespace) -> VisionTrainConfig | None:
    """The preset with the flags' overrides, or None for `--resume` alone (the run's saved config)."""
    given = args.config is not None or flags.given_fields(args, VisionTrainConfig, skip="dataset")
    if not given and args.resume:
        return None
    return flags.with_flags(preset(args.config or "cifar10"), args, skip="dataset")


def run(argv=None) -> TrainResult:
    """The command: parse, train, print the per-exit table and where the run is; the result. A
    user error exits with status 2, a stop (Ctrl-C, SIGTERM) with 130."""
    args = build_parser().parse_args(argv)
    console.setup()  # console: progress, tables, warnings, errors; the rest -> <run>/train.log
    result = console.train(lambda: train(config(args), resume=args.resume, progress=not args.no_progress))
    summary, out = result.summary, result.run
    print(f"\n{summary['data']}: test accuracy per exit ({summary['test_examples']} images, eval mode):\n"
          f"{format_table([row['accuracy'] for row in summary['per_layer']['test']])}")
    per_step = summary["seconds_per_step"]
    print(f"final exit: {summary['final_ramp']['test']['accuracy']:.4f} after {summary['steps']} steps"
          + (f"; {per_step:.3f} s/step at batch {result.config.batch_size}" if per_step else ""))
    console.report_run(out, args.results_dir)
    return result


def main(argv=None) -> None:
    """The console script `jaxexit-train-vision` (and train/train_vision.py)."""
    run(argv)
