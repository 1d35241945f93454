"""Fine-tune a multi-exit model on GLUE.

    python train/finetune.py --config sst2                      # bert-base-uncased, GLUE via tfds (online)
    python train/finetune.py --config sst2 --model ../shared/models/all-MiniLM-L6-v2 --data-dir ../shared/data/glue/SST-2
    python train/finetune.py --config mrpc --scheme joint        # PABEE/PCEE's joint weighted scheme
    python train/finetune.py --resume runs/sst2-two_stage-20261121-101500
    python train/finetune.py --config sst2 --coordinator host0:1234 --num-processes 2 --process-id 0   # on host0
    python train/finetune.py --config sst2 --coordinator host0:1234 --num-processes 2 --process-id 1   # on host1
    srun python train/finetune.py --config sst2 --distributed   # one process per SLURM task

The console script `jaxexit-finetune` is the same command.
"""

from __future__ import annotations

import argparse

from jaxexit.cli import console, flags
from jaxexit.text.train_config import PRESETS, TrainConfig, preset
from jaxexit.text.trainer import finetune
from jaxexit.training import parallel
from jaxexit.training.checkpoint import RunDir


def build_parser() -> argparse.ArgumentParser:
    """`--config PRESET` plus one `--field-name VALUE` per TrainConfig field but `task`, and the
    run's own switches."""
    parser = console.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sst2", metavar="PRESET",
                        help=f"task preset, the papers' recipe for it: {', '.join(PRESETS)} (default: sst2)")
    flags.add_field_arguments(parser, TrainConfig, skip="task")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run ('latest': the newest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--results-dir", metavar="DIR",
                        help="also copy summary.json, layers.csv and metrics.jsonl to DIR/<run name>/")
    group = parser.add_argument_group("multi-process (several hosts; docs/training.md#multi-host)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address and a free port, the same for every process "
                            f"(env {parallel.ENV_COORDINATOR})")
    group.add_argument("--num-processes", type=int, metavar="N",
                       help=f"how many processes the run has (env {parallel.ENV_NUM_PROCESSES})")
    group.add_argument("--process-id", type=int, metavar="I",
                       help="this process's id, 0..N-1; process 0 writes the run directory "
                            f"(env {parallel.ENV_PROCESS_ID})")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run, what is not given detected by jax from the cluster "
                            f"(SLURM, Open MPI, Cloud TPU) (env {parallel.ENV_AUTO}=1)")
    return parser


def distributed(args: argparse.Namespace) -> parallel.Distributed:
    """The multi-process flags (unset ones fall back to the environment when training starts)."""
    return parallel.Distributed(args.coordinator, args.num_processes, args.process_id, args.distributed)


def config(args: argparse.Namespace) -> TrainConfig:
    """The preset with the flags' overrides; a value out of range is a ValueError naming its flag."""
    return flags.with_flags(preset(args.config), args, skip="task")


def run(argv=None) -> RunDir:
    """The command: parse, fine-tune, print where the run is; the finished run directory. A user
    error exits with status 2, a stop (Ctrl-C, SIGTERM) with 130."""
    args = build_parser().parse_args(argv)
    console.setup()  # console: progress, tables, warnings, errors; the rest -> <run>/train.log
    parallel.request_distributed(distributed(args))  # joined when training starts, after the run name is checked
    out = console.train(lambda: finetune(config(args), resume=args.resume, progress=not args.no_progress))
    console.report_run(out, args.results_dir)
    return out


def main(argv=None) -> None:
    """The console script `jaxexit-finetune` (and train/finetune.py)."""
    run(argv)
