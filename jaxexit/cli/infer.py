"""`jaxexit-infer` (`infer/run.py`): early-exit inference with a fine-tuned checkpoint.

Loads a run (or an exported directory), picks inputs, runs a policy in a mode, times it against the
full model and reports (summary, JSON, predictions); or sweeps and calibrates offline. The work is done by
`jaxexit.analysis.inference`; this module holds the flags, the printing and stdin.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from jaxexit.analysis.inference import (calibrate, certify, policy_report, run_policy, sweep, write_json,
                                        write_predictions)
from jaxexit.cli import console
from jaxexit.cli.policy_flags import PARAM_FLAGS, add_policy_flags, policy_from_args, policy_label
from jaxexit.exits import offline, policies, risk, runners
from jaxexit.text import checkpoints, export, glue
from jaxexit.text.inputs import load_inputs, text_inputs
from jaxexit.text.model import EarlyExitModel

# --help's text (the scripts' usage, as infer/run.py has always shown it)
_USAGE = """Early-exit inference with a fine-tuned checkpoint.

    python infer/run.py --patience 2 --tau 0.2                 # PCEE on dev of the latest run
    python infer/run.py --policy entropy --S 0.3 --mode batched --batch-size 64
    python infer/run.py --sweep                                 # every policy over a grid (offline)
    python infer/run.py --policy pcee --patience 2 --target-saving 0.4   # patience fixed, tau calibrated
    python infer/run.py --policy entropy --max-risk 0.02       # S certified: differs from the full model <= 2%
    python infer/run.py --policy entropy --max-risk 0.02 --calibration-texts unlabelled.txt
    python infer/run.py --patience 2 --tau 0.9 --confidence maxprob --ensemble   # PCEE-BERT-v1, ensemble
    echo "a gripping film" | python infer/run.py --patience 2 --tau 0.2 --text -
    python infer/run.py --checkpoint exported/sst2 --max-risk 0.02   # an export: offline jobs read its table

An exported directory (jaxexit-export) is taken wherever a run is; what the command writes for it goes
to OUT.jaxexit/, beside it. Runs on texts need --data-dir (or --text); --sweep, --target-saving,
--max-drop and --max-risk read the export's calibration table when no --data-dir is given.
"""


def build_parser() -> argparse.ArgumentParser:
    p = console.Parser(description=_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a train/finetune.py run directory, or a jaxexit-export directory (default: "
                                        "the latest run in --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where train/finetune.py wrote its runs (default: runs)")
    add_policy_flags(p)
    p.add_argument("--split", default="dev",
                   help="dev | test (MNLI: both matched and mismatched, side by side), or one split: dev_matched, ...")
    p.add_argument("--data-dir", help="GLUE TSV directory (default: the one the checkpoint was trained on; an export: "
                                      "its calibration table, for offline jobs)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed TSV rows (reported: how many, and where) instead of stopping at the first")
    p.add_argument("--limit", type=int, default=0, help="use only the first N inputs")
    p.add_argument("--mode", choices=runners.MODES, default=None,
                   help="latency (default: batch 1, host decisions) | batched | device | offline")
    p.add_argument("--batch-size", type=int, default=None, help="batched/device/offline (default 64; device 1)")
    p.add_argument("--text", nargs="+", help="classify these texts ('-' reads lines from stdin; pairs: tab-separated)")
    p.add_argument("--output", help="write predictions: the GLUE submission TSV, and *.exits.tsv with exit layers")
    p.add_argument("--json", help="where to write the result JSON (default: <checkpoint>/infer/...)")
    p.add_argument("--sweep", action="store_true", help="offline: every policy over a grid -> CSV and PNG")
    p.add_argument("--target-saving", type=float,
                   help="calibrate the parameters not given to the best score with at least this saving on the "
                        "calibration half (no guarantee on new inputs; --max-risk gives one)")
    p.add_argument("--max-drop", type=float,
                   help="calibrate the parameters not given to the largest saving within this score drop on the "
                        "calibration half (no guarantee on new inputs; --max-risk gives one)")
    p.add_argument("--max-risk", type=float, metavar="EPS",
                   help="certify the parameters not given (Learn then Test): the largest saving whose --risk on new "
                        "inputs is at most EPS with probability >= 1 - --risk-delta")
    p.add_argument("--risk-delta", type=float, metavar="D",
                   help="certification: the probability that the guarantee fails (default 0.1)")
    p.add_argument("--risk", choices=risk.RISKS,
                   help="certification: consistency (default; the exit's prediction differs from the full model's, "
                        "needs no labels) | drop (the full model right, the exit wrong)")
    p.add_argument("--risk-bound", choices=risk.BOUNDS,
                   help="certification's p-values: binomial (default; the exact tail) | hb (Hoeffding-Bentkus)")
    p.add_argument("--risk-tolerance", type=float, metavar="T",
                   help="certification, regression only: outputs further apart than T differ (or are wrong)")
    p.add_argument("--calibration-texts", metavar="FILE",
                   help="certify on these unlabelled texts (one per line; pairs: a<TAB>b) instead of half the split; "
                        "a labelled split then reports the setting on all of it")
    p.add_argument("--split-seed", type=int, default=None,
                   help="calibration, certification: seed of the random split into calibration and report halves "
                        "(default 0)")
    return p


def check_flags(args) -> None:
    """Refuse a flag out of range, or one that cannot apply to what the other flags ask for
    (ValueError naming it)."""
    targets = [t for t in ("target_saving", "max_drop", "max_risk") if getattr(args, t) is not None]
    calibrating = bool(targets)
    certifying = args.max_risk is not None
    job = ("certification" if certifying else "calibration" if calibrating else "--sweep" if args.sweep
           else None)  # the offline jobs
    risk_flags = [f"--{k.replace('_', '-')}" for k in _RISK_FLAGS if getattr(args, k) is not None]
    out_of_range = [
        (len(targets) > 1, "give one calibration target: --target-saving, --max-drop or --max-risk, not more"),
        (certifying and not 0 < args.max_risk < 1, f"--max-risk must be in (0, 1), got {args.max_risk}"),
        (args.risk_delta is not None and not 0 < args.risk_delta < 1,
         f"--risk-delta must be in (0, 1), got {args.risk_delta}"),
        (args.risk_tolerance is not None and not args.risk_tolerance >= 0,
         f"--risk-tolerance must be >= 0, got {args.risk_tolerance}"),
        (args.risk == "drop" and args.calibration_texts is not None,
         "--risk drop needs labels: --calibration-texts are unlabelled, so they certify the consistency risk only"),
        (args.target_saving is not None and not 0 <= args.target_saving < 1,
         f"--target-saving must be in [0, 1), got {args.target_saving}"),
        (args.max_drop is not None and args.max_drop < 0, f"--max-drop must be >= 0, got {args.max_drop}"),
        (args.batch_size is not None and args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.limit < 0, f"--limit must be >= 0, got {args.limit}"),
    ]
    policy_flags = ([f"--{k}" for k in PARAM_FLAGS if getattr(args, k) is not None] + ["--policy"] * bool(args.policy)
                    + ["--confidence"] * (args.confidence is not None) + ["--ensemble"] * bool(args.ensemble))
    cannot_apply = [  # (the flags, given where they cannot apply; why)
        (policy_flags if job == "--sweep" else [],
         "--sweep evaluates every policy over its grid (add --target-saving or --max-drop to calibrate one policy)"),
        ([f for f, given in (("--mode", args.mode), ("--output", args.output), ("--text", args.text)) if given and job],
         f"{job} runs offline over cached logits"),
        (["--split-seed"] if args.split_seed is not None and (not calibrating or args.calibration_texts) else [],
         "it applies to calibration (--target-saving / --max-drop / --max-risk) on halves of the split only"),
        (risk_flags if not certifying else [], "it applies to certification (--max-risk) only"),
        (["--batch-size"] if args.batch_size is not None and not job and (args.mode or "latency") == "latency" else [],
         "latency mode runs one input at a time (use --mode batched or device)"),
    ]
    for bad, message in out_of_range:
        if bad:
            raise ValueError(message)
    for flags, why in cannot_apply:
        if flags:
            raise ValueError(f"{' '.join(flags)} cannot apply here: {why}")


_RISK_FLAGS = ("risk_delta", "risk", "risk_bound", "risk_tolerance", "calibration_texts")  # --max-risk's


def format_summary(r: dict) -> str:
    lines = [f"{r['task']} {r['split']} ({r['n']} inputs), {r['policy']} "
             + ", ".join(f"{k}={r[k]}" for k in policies.param_names(policies.parse_label(r['policy'])[0], r['num_labels']))
             + f", {r['mode']} mode"]
    if "metrics" in r:
        lines.append("score:        " + ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()))
    lines.append(f"layers:       {r['avg_layers']:.2f} of {r['num_layers']} on average; saving {r['saving']:.3f}, "
                 f"speedup {r['speedup']:.2f}x")
    if "wall_saving" in r:
        lines.append(f"time:         early exit {r['time_early_exit_s']:.3f} s, full model {r['time_full_model_s']:.3f} s "
                     f"-> wall saving {r['wall_saving']:.3f} (saving {r['saving']:.3f})")
    hist = r["exit_histogram"]
    lines.append("exits/layer:  " + "  ".join(f"{i + 1}:{c}" for i, c in enumerate(hist)))
    if "per_layer" in r:
        name = r["metric"]
        lines.append(f"ramp {name}: " + "  ".join(f"{i + 1}:{m[name]:.3f}" for i, m in enumerate(r["per_layer"])))
    return "\n".join(lines)


def format_calibration(name: str, cal: dict) -> str:
    fixed = ", ".join(f"{k}={v}" for k, v in cal["fixed"].items()) or "none"
    chosen = ", ".join(f"{k}={v}" for k, v in cal["chosen"].items())
    return (f"calibrated {name} ({cal['rule']}): fixed {fixed}; chosen {chosen}\n  {cal['halves']}\n"
            f"  calibration half: {_brief(cal['calibration_half'])}\n  report half:      {_brief(cal['report_half'])}")


def format_certification(cert: dict) -> str:
    """The certificate's line, where it was certified, and the setting's report line."""
    c, r = cert["certificate"], cert["report"]
    lines = [cert["summary"], "  " + (cert["halves"] if "halves" in cert else
                                      f"certified on {cert['calibration_inputs']} unlabelled calibration texts")]
    if r:
        where = "report half" if "halves" in cert else "the split"
        lines.append(f"  {where} ({r['n']} inputs): realised {c['risk']} risk {r['risk']:.4f} (max {c['max_risk']}), "
                     f"saving {r['saving']:.3f}, score {r['score']:.4f} (full {r['full_score']:.4f}, "
                     f"drop {r['drop']:.4f})")
    return "\n".join(lines)


def side_by_side(task: glue.Task, results: dict) -> str:
    """One line per split with its score, saving and (live modes) wall saving, as GLUE reports
    MNLI's matched and mismatched dev sets."""
    lines = [f"{task.tsv_dir}, side by side:"]
    for split_name, r in results.items():
        row = (r["calibration"]["report_half"] if "calibration" in r else
               r["certification"]["report"] if "certification" in r else r)
        if not row or "score" not in row:
            continue
        wall = f", wall saving {r['wall_saving']:.3f}" if "wall_saving" in r else ""
        lines.append(f"  {split_name:<22} score {row['score']:.4f}, saving {row['saving']:.3f}{wall}")
    return "\n".join(lines) if len(lines) > 1 else ""


def _brief(row: dict | None) -> str:
    if not row:
        return "-"
    keys = [k for k in ("score", "full_score", "drop", "saving", "avg_layers") if k in row]
    return ", ".join(f"{k} {row[k]:.4f}" for k in keys)


def _run(args) -> dict:
    """What the flags `args` ask for; the result dict (per split, for MNLI's two dev sets)."""
    check_flags(args)
    texts = calibration_lines(args.calibration_texts) if args.calibration_texts else None
    run = checkpoints.resolve_checkpoint(args.checkpoint, args.runs_dir)  # a run, or an exported directory
    train_cfg = run.train_config()
    if isinstance(run, checkpoints.ExportDir):
        task, model = run.task(), run.load_model()
    else:
        task, model = glue.get_task(train_cfg["task"]), EarlyExitModel.from_run(run.path)
    L, C = model.num_layers, model.config.num_labels
    params = {k: getattr(args, k) for k in PARAM_FLAGS}
    calibrating = any(getattr(args, t) is not None for t in ("target_saving", "max_drop", "max_risk"))
    mode = args.mode or "latency"
    out_dir = checkpoints.work_dir(run) / "infer"

    if args.text:
        lines = sys.stdin.read().splitlines() if args.text == ["-"] else args.text
        split = text_inputs(model, task, lines)
        policy = policy_from_args(args.policy, params, L, C, args.confidence, args.ensemble)
        exits, _ = run_policy(model, policy, split, "latency" if mode == "offline" else mode, args.batch_size or 1)
        for line, m, p, z in zip([x for x in lines if x.strip()], exits.exit_layer, exits.prediction, exits.logits):
            shown = f"{float(p):.3f}" if task.is_regression else task.label_names[int(p)]
            top = float(z.max()) if policy.ensemble else float(policies.max_prob(z[None])[0])  # ensemble: probabilities
            conf = "" if task.is_regression else f"  p={top:.3f}"
            print(f"{shown}\tlayer {int(m)}/{L}{conf}\t{line}")
        return {"predictions": exits.prediction.tolist(), "exit_layer": exits.exit_layer.tolist()}

    data_dir = args.data_dir or train_cfg.get("data_dir")
    calibration = None  # the unlabelled texts' ramp outputs, certified on once for every split
    if texts is not None:
        calibration = runners.cached_logits(model, text_inputs(model, task, texts), args.batch_size or 64)
    results = {}
    splits = glue.resolve_splits(task, args.split)  # MNLI's dev: matched and mismatched
    for split_name in splits:
        meta = {"task": task.name, "split": split_name, "checkpoint": str(run.path), "num_labels": C}
        tag = split_name if len(splits) > 1 else None  # in output file names given by flags
        if isinstance(run, checkpoints.ExportDir) and data_dir is None:  # the export's table, or nothing
            cached, labels = _export_table(run, task, split_name, args.limit, args.sweep or calibrating)
            results[split_name] = _offline_job(args, task, model, None, labels, meta, params, out_dir, tag,
                                               calibration, cached)
            continue
        split, _ = load_inputs(run, model, task, split_name, data_dir, args.limit, args.skip_bad_rows)
        labels = split.labels if split.labelled else None
        if args.sweep or calibrating:
            results[split_name] = _offline_job(args, task, model, split, labels, meta, params, out_dir, tag,
                                               calibration)
        else:
            results[split_name] = _run_job(args, task, model, split, labels, meta, params, mode, out_dir, tag)
    if len(results) == 1:
        return next(iter(results.values()))
    side = side_by_side(task, results)
    if side:
        print(side)
    return {"splits": results}


def calibration_lines(path: str) -> list[str]:
    """`--calibration-texts`: the file's non-blank lines (ValueError for a missing or empty file)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--calibration-texts {path} does not exist (one text per line; pairs: a<TAB>b)")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--calibration-texts {path} holds no text (one text per line; pairs: a<TAB>b)")
    return lines


def _export_table(export_dir, task, split_name: str, limit: int, offline_job: bool):
    """An export's calibration table as `(cached ramp outputs, labels)` of `split_name` (first `limit`),
    for an offline job run without --data-dir; ValueError saying what is needed otherwise."""
    if not offline_job:
        raise ValueError(f"{export_dir.path} is an exported model: it carries ramp outputs on its calibration split, "
                         f"not the texts a policy runs on; pass --data-dir (the {task.tsv_dir} GLUE TSV directory), "
                         "--text, or an offline job (--sweep, --target-saving, --max-drop, --max-risk)")
    table = export_dir.table_on(split_name)
    rows = np.arange(len(table.labels))[:limit or None]
    print(f"{task.tsv_dir} {split_name}: ramp outputs of {len(rows)} inputs from {export_dir.path / export.TABLE} "
          "(no data read)")
    return offline.take(table.outputs, rows), table.labels[rows]


def _offline_job(args, task, model, split, labels, meta, params, out_dir, tag, calibration=None,
                 cached=None) -> dict:
    split_name = meta["split"]
    if labels is None and args.risk == "drop":
        raise ValueError(f"{split_name} has no labels, and the drop risk needs them (the full model right, the exit "
                         "wrong); use a labelled split (dev) or --risk consistency")
    if labels is None and (args.sweep or calibration is None):
        raise ValueError(f"{split_name} has no labels: sweeps and calibration need a labelled split (dev), "
                         "or --max-risk with unlabelled --calibration-texts")
    if cached is None and labels is not None:
        cached = runners.cached_logits(model, split, args.batch_size or 64)
    result = dict(meta)
    if args.sweep:
        csv_path, png, rows = sweep(task, cached, labels, out_dir / f"sweep-{split_name}")
        result.update(sweep_csv=str(csv_path), sweep_png=str(png), settings=len(rows))
        print(f"swept {len(rows)} settings of {len({r['policy'] for r in rows})} policies on {split_name} "
              f"-> {csv_path}, {png}")
    if args.target_saving is not None or args.max_drop is not None:
        name = policy_label(args.policy, params, args.confidence, args.ensemble)
        fixed = {k: v for k, v in params.items() if v is not None}
        seed = 0 if args.split_seed is None else args.split_seed
        cal = calibrate(task, name, cached, labels, target_saving=args.target_saving, max_drop=args.max_drop,
                        fixed=fixed, seed=seed)
        result["calibration"] = cal
        print(f"{task.tsv_dir} {split_name}: " + format_calibration(name, cal))
    if args.max_risk is not None:
        name = policy_label(args.policy, params, args.confidence, args.ensemble)
        fixed = {k: v for k, v in params.items() if v is not None}
        cert = certify(task, name, cached, labels, max_risk=args.max_risk, delta=args.risk_delta or 0.1,
                       risk_name=args.risk or "consistency", method=args.risk_bound or "binomial",
                       tolerance=args.risk_tolerance, fixed=fixed, seed=args.split_seed or 0, calibration=calibration)
        result["certification"] = cert
        print(f"{task.tsv_dir} {split_name}: " + format_certification(cert))
    job = "sweep" if args.sweep else "certification" if args.max_risk is not None else "calibration"
    default = out_dir / f"{job}-{split_name}.json"
    print(f"wrote {write_json(_named(args.json, default, tag), result)}")
    return result


def _run_job(args, task, model, split, labels, meta, params, mode, out_dir, tag) -> dict:
    split_name = meta["split"]
    policy = policy_from_args(args.policy, params, model.num_layers, model.config.num_labels, args.confidence,
                              args.ensemble)
    batch_size = args.batch_size or (1 if mode in ("latency", "device") else 64)
    exits, full_seconds = run_policy(model, policy, split, mode, batch_size)
    cached = runners.cached_logits(model, split, 64) if labels is not None else None
    result = policy_report(task, policy, exits, full_seconds, labels, cached, {**meta, "mode": mode, "batch_size": batch_size})
    print(format_summary(result))
    setting = "-".join(f"{k}{v}" for k, v in policy.params)
    default = out_dir / f"{policy.label}-{setting}-{split_name}-{mode}.json"
    print(f"wrote {write_json(_named(args.json, default, tag), result)}")
    if args.output:
        print(f"predictions: {write_predictions(_named(args.output, None, tag), task, split.idx, exits)}")
    return result


def _named(given: str | None, default: Path | None, tag: str | None) -> Path:
    """A path given by a flag (with `-<tag>` before its suffix when one command covers several
    splits, MNLI's matched and mismatched), else `default` (which names its split already)."""
    if not given:
        return default
    path = Path(given)
    return path.with_name(f"{path.stem}-{tag}{path.suffix}") if tag else path


def run(argv=None) -> dict | None:
    """The command on `argv` (default: the process's); its result dict. A user error ends it with
    `error: ...` and exit status 2 (`console.fail`)."""
    args = build_parser().parse_args(argv)
    console.setup(keep_for_file=False)  # warnings and errors; no library chatter
    try:
        return _run(args)
    except console.USER_ERRORS as e:
        console.fail(str(e), e)


def main(argv=None) -> None:
    """The console script `jaxexit-infer`."""
    run(argv)
