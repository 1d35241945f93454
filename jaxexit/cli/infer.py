"""What `infer/run.py` does: load a run, pick inputs, run a policy in a mode, time it against the
full model, and report (summary, JSON, predictions); or sweep and calibrate offline."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from jaxexit.text import batches, glue, metrics
from jaxexit.exits import offline, policies, runners
from jaxexit.text.model import EarlyExitModel
from jaxexit.training.checkpoint import RunDir
from jaxexit.cli.policy_flags import PARAM_FLAGS, policy_from_args, policy_label


def resolve_run(checkpoint: str | None, output_dir: str = "runs") -> RunDir:
    """`--checkpoint`, or the most recent run of train/finetune.py (runs/LATEST)."""
    run = RunDir(checkpoint) if checkpoint else RunDir.latest(output_dir)
    if not run.path.is_dir():
        raise FileNotFoundError(f"checkpoint {run.path} does not exist")
    if not (run.path / "train_config.json").is_file():
        raise FileNotFoundError(f"{run.path} is not a train/finetune.py run directory (no train_config.json)")
    return run


def load_inputs(run: RunDir, model: EarlyExitModel, task: glue.Task, split: str, data_dir: str | None,
                limit: int = 0, skip_bad_rows: bool = False) -> tuple[batches.EncodedSplit, list[glue.Example]]:
    if data_dir is not None:
        other = {t.tsv_dir.lower(): t for t in glue.TASKS.values() if t is not task}.get(Path(data_dir).name.lower())
        if other is not None:
            raise ValueError(f"the checkpoint {run.path} was trained on {task.tsv_dir}, but --data-dir {data_dir} "
                             f"holds {other.tsv_dir}")
    examples = glue.load_examples(task, split, data_dir, skip_bad_rows=skip_bad_rows)
    if limit:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"{task.tsv_dir} {split} has no examples")
    return batches.encode_examples(model.tokenizer, task, examples), examples


def text_inputs(model: EarlyExitModel, task: glue.Task, lines: list[str]) -> batches.EncodedSplit:
    """Own sentences (pairs separated by a tab for pair tasks)."""
    lines = [line for line in (x.rstrip("\n") for x in lines) if line.strip()]
    if not lines:
        raise ValueError("no input text: pass --text or lines on stdin")
    examples = []
    for i, line in enumerate(lines):
        parts = line.split("\t")
        if task.is_pair and len(parts) != 2:
            raise ValueError(f"{task.tsv_dir} takes sentence pairs: line {i + 1} needs two tab-separated parts")
        examples.append(glue.Example(i, parts[0], parts[1] if task.is_pair else None, None))
    return batches.encode_examples(model.tokenizer, task, examples)


def run_policy(model: EarlyExitModel, policy: policies.Policy, split: batches.EncodedSplit, mode: str,
               batch_size: int) -> tuple[runners.Exits, float | None]:
    """Early-exit results and the full model's time on the same inputs, batch size and mode."""
    if mode == "latency":
        return runners.run_latency(model, policy, split), runners.run_full_latency(model, split)[1]
    if mode == "batched":
        return (runners.run_batched(model, policy, split, batch_size),
                runners.run_full_batched(model, split, batch_size)[1])
    if mode == "device":
        return (runners.run_on_device(model, policy, split, batch_size),
                runners.run_full_batched(model, split, batch_size)[1])
    if mode == "offline":
        cached = runners.cached_logits(model, split, max(batch_size, 1))
        ev = offline.evaluate(policy, cached)
        return runners.Exits(ev.exit_layer, ev.prediction, offline.exit_outputs(policy, cached, ev.exit_layer),
                             math.nan), None
    raise ValueError(f"unknown mode {mode!r}; choose one of {runners.MODES}")


def report(task: glue.Task, policy: policies.Policy, exits: runners.Exits, full_seconds: float | None,
           labels: np.ndarray | None, cached: np.ndarray | None, meta: dict) -> dict:
    L = policy.num_layers
    eff = offline.efficiency(exits.exit_layer, L)
    out = {**meta, **policy.as_dict(), "num_layers": L, "n": int(len(exits.exit_layer)), **eff,
           "exit_histogram": offline.exit_histogram(exits.exit_layer, L).tolist()}
    if full_seconds is not None and not math.isnan(exits.seconds):
        out.update(time_early_exit_s=round(exits.seconds, 4), time_full_model_s=round(full_seconds, 4),
                   wall_saving=1.0 - exits.seconds / full_seconds)
    if labels is not None:
        out["metrics"] = metrics.task_metrics(task, exits.prediction, labels)
        out["metric"] = metrics.primary_metric(task)
        out["score"] = out["metrics"][out["metric"]]
        if cached is not None:
            out["per_layer"] = [metrics.task_metrics(task, policies.prediction(z), labels)
                                for z in offline.parts(cached)[0]]
    return out


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


def write_predictions(path: str | os.PathLike, task: glue.Task, idx: np.ndarray, exits: runners.Exits) -> Path:
    """The GLUE submission TSV (index, prediction) and, beside it, each input's exit layer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = task.label_names

    def label(p):
        if task.is_regression:
            return f"{float(p):.3f}"
        return names[int(p)] if task.name in ("mnli", "qnli", "rte") else str(int(p))

    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "prediction"])
        w.writerows([int(i), label(p)] for i, p in zip(idx, exits.prediction))
    exits_path = path.with_name(path.stem + ".exits.tsv")
    with open(exits_path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "prediction", "exit_layer"])
        w.writerows([int(i), label(p), int(m)] for i, p, m in zip(idx, exits.prediction, exits.exit_layer))
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


# ---- offline sweep and calibration ------------------------------------------------------------
def sweep(task: glue.Task, cached: np.ndarray, labels: np.ndarray, out_prefix: Path) -> tuple[Path, Path, list[dict]]:
    """Every policy over its default grid: CSV of (policy, params, score, saving, ...) and a PNG."""
    rows = offline.sweep(cached, labels, metrics.primary_scorer(task))
    csv_path = out_prefix.with_suffix(".csv")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "params", "score", "avg_layers", "saving", "speedup", "exit_histogram"])
        for r in rows:
            w.writerow([r["policy"], json.dumps(r["params"], sort_keys=True), f"{r['score']:.5f}",
                        f"{r['avg_layers']:.4f}", f"{r['saving']:.4f}", f"{r['speedup']:.4f}",
                        " ".join(map(str, r["exit_histogram"]))])
    png = out_prefix.with_suffix(".png")
    plot_tradeoff(rows, metrics.primary_metric(task), f"{task.tsv_dir}: score vs saving", png)
    return csv_path, png, rows


def pareto_front(rows: list[dict]) -> list[tuple[float, float]]:
    """(saving, score) points no other row beats on both, from the largest saving down."""
    front, best = [], -math.inf
    for saving, score in sorted(((r["saving"], r["score"]) for r in rows), key=lambda p: (-p[0], -p[1])):
        if score > best:  # from the largest saving down: keep points that improve the score
            front.append((saving, score))
            best = score
    return front


def plot_tradeoff(rows: list[dict], metric_name: str, title: str, path: Path) -> None:
    """Score against saving, one curve per policy (its Pareto front over the grid) plus all points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == name]
        ax.scatter([r["saving"] for r in mine], [r["score"] for r in mine], s=6, alpha=0.25)
        front = pareto_front(mine)
        ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", ms=3, label=name,
                color=ax.collections[-1].get_facecolor()[0][:3])
    ax.set_xlabel("saving = 1 - avg_layers / L")
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def calibrate(task: glue.Task, name: str, cached: np.ndarray, labels: np.ndarray, *, target_saving=None,
              max_drop=None, fixed: dict | None = None, seed: int = 0) -> dict:
    """Choose the policy's open parameters (those not in `fixed`) on a seeded random half of the
    split (`offline.split_halves`) and report the choice on the other half."""
    halves = offline.split_halves(len(labels), seed)
    cal = offline.calibrate_on_halves(name, cached, labels, metrics.primary_scorer(task), halves,
                                      target_saving=target_saving, max_drop=max_drop, fixed=fixed)
    return {"policy": cal.policy.as_dict(), "fixed": cal.fixed, "chosen": cal.chosen, "rule": cal.rule,
            "split_seed": seed, "calibration_half": cal.calibration, "report_half": cal.heldout,
            "halves": offline.describe_halves(halves, seed)}


def format_calibration(name: str, cal: dict) -> str:
    fixed = ", ".join(f"{k}={v}" for k, v in cal["fixed"].items()) or "none"
    chosen = ", ".join(f"{k}={v}" for k, v in cal["chosen"].items())
    return (f"calibrated {name} ({cal['rule']}): fixed {fixed}; chosen {chosen}\n  {cal['halves']}\n"
            f"  calibration half: {_brief(cal['calibration_half'])}\n  report half:      {_brief(cal['report_half'])}")


def check_flags(args) -> None:
    """Refuse a flag out of range, or one that cannot apply to what the other flags ask for
    (ValueError naming it)."""
    calibrating = args.target_saving is not None or args.max_drop is not None
    job = "calibration" if calibrating else "--sweep" if args.sweep else None  # the offline jobs
    out_of_range = [
        (calibrating and args.target_saving is not None and args.max_drop is not None,
         "give one calibration target: --target-saving or --max-drop, not both"),
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
        (["--split-seed"] if args.split_seed is not None and not calibrating else [],
         "it applies to calibration (--target-saving / --max-drop) only"),
        (["--batch-size"] if args.batch_size is not None and not job and (args.mode or "latency") == "latency" else [],
         "latency mode runs one input at a time (use --mode batched or device)"),
    ]
    for bad, message in out_of_range:
        if bad:
            raise ValueError(message)
    for flags, why in cannot_apply:
        if flags:
            raise ValueError(f"{' '.join(flags)} cannot apply here: {why}")


# ---- the command line (infer/run.py) -----------------------------------------------------------
def main_cli(args) -> dict:
    import sys

    check_flags(args)
    run = resolve_run(args.checkpoint, args.runs_dir)
    train_cfg = run.train_config()
    task = glue.get_task(train_cfg["task"])
    model = EarlyExitModel.from_run(run.path)
    L, C = model.num_layers, model.config.num_labels
    params = {k: getattr(args, k) for k in PARAM_FLAGS}
    calibrating = args.target_saving is not None or args.max_drop is not None
    mode = args.mode or "latency"
    out_dir = run.path / "infer"

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
    results = {}
    splits = glue.resolve_splits(task, args.split)  # MNLI's dev: matched and mismatched
    for split_name in splits:
        split, _ = load_inputs(run, model, task, split_name, data_dir, args.limit, args.skip_bad_rows)
        labels = split.labels if split.labelled else None
        meta = {"task": task.name, "split": split_name, "checkpoint": str(run.path), "num_labels": C}
        tag = split_name if len(splits) > 1 else None  # in output file names given by flags
        if args.sweep or calibrating:
            results[split_name] = _offline_job(args, task, model, split, labels, meta, params, out_dir, tag)
        else:
            results[split_name] = _run_job(args, task, model, split, labels, meta, params, mode, out_dir, tag)
    if len(results) == 1:
        return next(iter(results.values()))
    side = side_by_side(task, results)
    if side:
        print(side)
    return {"splits": results}


def _offline_job(args, task, model, split, labels, meta, params, out_dir, tag) -> dict:
    split_name = meta["split"]
    if labels is None:
        raise ValueError(f"{split_name} has no labels: sweeps and calibration need a labelled split (dev)")
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
    default = out_dir / f"{'sweep' if args.sweep else 'calibration'}-{split_name}.json"
    print(f"wrote {write_json(_named(args.json, default, tag), result)}")
    return result


def _run_job(args, task, model, split, labels, meta, params, mode, out_dir, tag) -> dict:
    split_name = meta["split"]
    policy = policy_from_args(args.policy, params, model.num_layers, model.config.num_labels, args.confidence,
                              args.ensemble)
    batch_size = args.batch_size or (1 if mode in ("latency", "device") else 64)
    exits, full_seconds = run_policy(model, policy, split, mode, batch_size)
    cached = runners.cached_logits(model, split, 64) if labels is not None else None
    result = report(task, policy, exits, full_seconds, labels, cached, {**meta, "mode": mode, "batch_size": batch_size})
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


def side_by_side(task: glue.Task, results: dict) -> str:
    """One line per split with its score, saving and (live modes) wall saving, as GLUE reports
    MNLI's matched and mismatched dev sets."""
    lines = [f"{task.tsv_dir}, side by side:"]
    for split_name, r in results.items():
        row = r["calibration"]["report_half"] if "calibration" in r else r
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
