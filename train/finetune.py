"""Fine-tune a multi-exit model on GLUE.

    python train/finetune.py --config sst2
    python train/finetune.py --config mrpc --model ../shared/models/all-MiniLM-L6-v2 \
        --data-dir ../shared/data/glue/MRPC --scheme joint
    python train/finetune.py --resume runs/sst2-two_stage-20261121-101500
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from jaxexit import train_config  # noqa: E402
from jaxexit.trainer import finetune  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_config.add_arguments(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run ('latest': the newest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--results-dir", metavar="DIR",
                        help="also copy summary.json, layers.csv and metrics.jsonl to DIR/<run name>/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    try:
        cfg = train_config.from_arguments(args)
    except ValueError as e:
        parser.error(str(e))
    run = finetune(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run directory: {run.path}")
    if args.results_dir:
        print(f"results copied to {run.export_results(args.results_dir)}")


if __name__ == "__main__":
    main()
