"""Train a multi-exit ResNet (an exit after every residual block) on CIFAR: PCEE-BERT section 4.6.4.

    python train/train_vision.py --config cifar10 --data-dir /tmp/cifar10     # image folder {train,test}/<class>/*
    python train/train_vision.py --config cifar100                            # tensorflow-datasets (online)
    python train/train_vision.py --config cifar10 --epochs 164 --schedule step   # He et al.'s full recipe
    python train/train_vision.py --resume runs/cifar10-resnet56-20261121-101500
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from jaxexit.cli import console  # noqa: E402
from jaxexit.vision import config as vision_config
from jaxexit.training.checkpoint import Stopped  # noqa: E402
from jaxexit.vision.train import format_table, train  # noqa: E402


def main(argv=None):
    parser = console.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vision_config.add_arguments(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (its saved settings)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--results-dir", metavar="DIR",
                        help="also copy summary.json, layers.csv, metrics.jsonl and train_config.json to DIR/<run name>/")
    args = parser.parse_args(argv)
    console.setup()  # console: progress, tables, warnings, errors; the rest -> <run>/train.log
    try:
        given = args.config is not None or vision_config.overrides(args)
        cfg = vision_config.from_arguments(args) if given or not args.resume else None
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except Stopped as e:
        console.stopped(e)
    except console.USER_ERRORS as e:
        console.fail(str(e), e)
    summary, run = result.summary, result.run
    print(f"\n{summary['data']}: test accuracy per exit ({summary['test_examples']} images, eval mode):\n"
          f"{format_table([row['accuracy'] for row in summary['per_layer']['test']])}")
    per_step = summary["seconds_per_step"]
    print(f"final exit: {summary['final_ramp']['test']['accuracy']:.4f} after {summary['steps']} steps"
          + (f"; {per_step:.3f} s/step at batch {result.config.batch_size}" if per_step else ""))
    print(f"run directory: {run.path} (log: {run.path / console.LOG_FILE})")
    if args.results_dir:
        print(f"results copied to {run.export_results(args.results_dir)}")
    return result


if __name__ == "__main__":
    main()
