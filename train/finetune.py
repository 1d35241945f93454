"""Fine-tune a multi-exit model on GLUE.

    python train/finetune.py --config sst2                      # bert-base-uncased, GLUE via tfds (online)
    python train/finetune.py --config sst2 --model ../shared/models/all-MiniLM-L6-v2 --data-dir ../shared/data/glue/SST-2
    python train/finetune.py --config mrpc --scheme joint        # PABEE/PCEE's joint weighted scheme
    python train/finetune.py --resume runs/sst2-two_stage-20261121-101500
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from jaxexit.cli import console  # noqa: E402
from jaxexit.text import train_config
from jaxexit.training.checkpoint import Stopped  # noqa: E402
from jaxexit.text.trainer import finetune  # noqa: E402


def main(argv=None):
    parser = console.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_config.add_arguments(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run ('latest': the newest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--results-dir", metavar="DIR",
                        help="also copy summary.json, layers.csv and metrics.jsonl to DIR/<run name>/")
    args = parser.parse_args(argv)
    console.setup()  # console: progress, tables, warnings, errors; the rest -> <run>/train.log
    try:
        cfg = train_config.from_arguments(args)
        run = finetune(cfg, resume=args.resume, progress=not args.no_progress)
    except Stopped as e:
        console.stopped(e)
    except console.USER_ERRORS as e:
        console.fail(str(e), e)
    print(f"run directory: {run.path} (log: {run.path / console.LOG_FILE})")
    if args.results_dir:
        print(f"results copied to {run.export_results(args.results_dir)}")
    return run


if __name__ == "__main__":
    main()
