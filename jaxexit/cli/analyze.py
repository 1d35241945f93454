"""`jaxexit-analyze` (`infer/analyze.py`): the papers' tables and figures for fine-tuned runs, and
tables gathered over runs. The work is done by `jaxexit.analysis`; this module holds the flags and
the printing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from jaxexit import analysis
from jaxexit.analysis import risk as risk_analysis
from jaxexit.analysis.report import report
from jaxexit.cli import console
from jaxexit.exits import runners
from jaxexit.text import checkpoints, glue
from jaxexit.text.inputs import load_inputs
from jaxexit.training.checkpoint import RunDir

# --help's text (the scripts' usage, as infer/analyze.py has always shown it)
_USAGE = """The papers' tables and figures for fine-tuned runs (DeeBERT Table 1 / Figures 2-4, 6; PCEE-BERT Table 2).

    python infer/analyze.py runs/mrpc-joint --out results/analysis/mrpc-joint
    python infer/analyze.py --tables results/analysis --out results/tables.md
    python infer/analyze.py runs/cifar10-resnet56 --out results/vision/cifar10-resnet56
    python infer/analyze.py --risk-from results/analysis/mrpc-joint results/vision/cifar10-resnet56
    python infer/analyze.py exported/sst2 --out results/analysis/sst2-export   # an export: its calibration table

A train/train_vision.py run (multi-exit ResNet) is analysed on its test split the same way, plus
PCEE-BERT's Table 3 form (PABEE against PCEE at the savings nearest 75/50/25%).

The first form runs one cached pass over dev (plus timed latency runs for the wall-saving figure)
and writes analysis.json, tables.md, logits.npy, tradeoff.{csv,png}, per_layer.png,
exit_histograms.png and wall_saving.png under --out (for MNLI, whose dev is two splits, under
--out/validation_matched/ and --out/validation_mismatched/). Thresholds are chosen on a seeded
random half of the split and reported on the other half. The second gathers every analysis.json
under the given directories into one markdown file (mean and spread over seeds). --risk-from
remakes the certified-settings files (risk.md, risk.json, risk_violations.png) of committed analysis
directories from their logits.npy and the split's labels, without the checkpoint (--data-dir: the
GLUE root or an image folder; default ../shared/data/glue, ../shared/data/cifar10).

An exported directory (jaxexit-export) is analysed from its calibration table, with no data and no
wall-saving timing (the table holds ramp outputs, not texts); with --data-dir, from that data, timed.
"""


def build_parser() -> argparse.ArgumentParser:
    p = console.Parser(description=_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run or exported directories (or, with --tables, analysis directories)")
    p.add_argument("--out", help="output directory (with --tables: the markdown file); required but with --risk-from")
    p.add_argument("--tables", action="store_true", help="gather analysis.json files into tables")
    p.add_argument("--risk-from", action="store_true",
                   help="the paths are analysis directories: remake their risk.* files from logits.npy (in place)")
    p.add_argument("--risk-splits", type=int, default=risk_analysis.SPLITS,
                   help="random halves the violation counts go over (default %(default)s)")
    p.add_argument("--data-dir", help="GLUE TSV directory, or for a train/train_vision.py run an image folder "
                                      "(default: the data the run was trained on)")
    p.add_argument("--split", default="dev", help="dev (MNLI: matched and mismatched, each analysed) or one split "
                                                  "(image runs: always test)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the random split into calibration and report halves (default 0)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed TSV rows (reported) instead of stopping at the first")
    p.add_argument("--timing-inputs", type=int, default=200,
                   help="held-out inputs timed in latency mode for the wall-saving figure (0: skip)")
    return p


def run(argv=None):
    """The command on `argv` (default: the process's): the markdown text (--tables), else the
    analysis dict (per split for MNLI's two dev sets). A user error ends it with `error: ...` and
    exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup(keep_for_file=False)  # warnings and errors; no library chatter
    command = "python infer/analyze.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    if not args.risk_from and not args.out:
        parser.error("--out is required (except with --risk-from)")
    try:
        if args.risk_from:
            for path in args.paths:
                result = risk_analysis.regenerate(path, args.data_dir, args.risk_splits, command)
                print(f"wrote {Path(path) / 'risk.md'}, risk.json, risk_violations.png "
                      f"({len(result['table'])} table rows, {result['violations']['splits']} splits)")
            return result
        if args.tables:
            text = analysis.tables(analysis.load_analyses(args.paths), command=command)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(text)
            return text
        if len(args.paths) != 1:
            parser.error("give one run directory (or --tables)")
        if args.timing_inputs < 0:
            parser.error(f"--timing-inputs must be >= 0, got {args.timing_inputs}")
        if checkpoints.is_export_dir(args.paths[0]):
            return _analyze_export(checkpoints.resolve_checkpoint(args.paths[0]), args, command)
        run_dir = RunDir(args.paths[0])
        text_run = (run_dir.path / "train_config.json").is_file() and not analysis.is_vision_run(run_dir.path)
        task = glue.get_task(run_dir.train_config()["task"]) if text_run else None
        splits = glue.resolve_splits(task, args.split) if task else (args.split,)
        results = {}
        for split in splits:
            out = Path(args.out) / split if len(splits) > 1 else Path(args.out)
            results[split] = analysis.analyze(args.paths[0], out, args.data_dir, split, args.timing_inputs, command,
                                              split_seed=args.split_seed, skip_bad_rows=args.skip_bad_rows)
            print((out / "tables.md").read_text())
            print(f"wrote {out}/")
        return results[splits[0]] if len(splits) == 1 else results
    except console.USER_ERRORS as e:
        console.fail(str(e), e)


def _analyze_export(source: checkpoints.ExportDir, args, command: str):
    """The analyses of an exported directory: over its calibration table (no data; no wall-saving timing,
    the table holding ramp outputs, not texts), or with --data-dir over that split, timed."""
    task = source.task()
    splits = glue.resolve_splits(task, args.split)
    model = source.load_model() if args.data_dir else None
    recipe = source.train_config()
    about = {"task": task.name, "tsv_dir": task.tsv_dir, "checkpoint": str(source.path),
             "scheme": recipe.get("scheme") or "unknown", "seed": recipe.get("seed", 0),
             "model": recipe.get("model") or source.path.name}
    results = {}
    for split in splits:
        out = Path(args.out) / split if len(splits) > 1 else Path(args.out)
        timing, time_settings = 0, None
        if model is None:
            table = source.table_on(split)
            outputs, labels = table.outputs, table.labels
            if args.timing_inputs:
                print(f"{source.path}: the calibration table's ramp outputs ({len(labels)} inputs; no data read), "
                      "no wall-saving timing (it needs the texts: pass --data-dir)")
        else:
            data, _ = load_inputs(source, model, task, split, args.data_dir, skip_bad_rows=args.skip_bad_rows)
            if not data.labelled:
                raise ValueError(f"{task.tsv_dir} {split} has no labels; the analyses need a labelled split")
            outputs, labels, timing = runners.cached_logits(model, data), data.labels, args.timing_inputs
            time_settings = _timer(model, data)
        results[split] = report(task, outputs, labels, out, {**about, "split": split}, time_settings, timing,
                                command, args.split_seed)
        print((out / "tables.md").read_text())
        print(f"wrote {out}/")
    return results[splits[0]] if len(splits) == 1 else results


def _timer(model, data):
    """`report`'s `time_settings` over `data`: the chosen settings timed in latency mode."""
    return lambda rows, settings: analysis.wall_savings(model, data.take(rows), settings)


def main(argv=None) -> None:
    """The console script `jaxexit-analyze`."""
    run(argv)
