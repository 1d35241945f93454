"""One policy on one split of a text run: its exits in a mode, timed against the full model on
the same inputs (`run_policy`), the result dict `jaxexit-infer` prints and writes
(`policy_report`), the GLUE submission files (`write_predictions`); offline, every policy over
its grid (`sweep`), one policy calibrated on half the split (`calibrate`, no guarantee) or
certified (`certify`, Learn then Test: its risk is at most eps with probability 1 - delta).
docs/policies.md describes the modes and both rules."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from jaxexit.analysis.plots import plot_tradeoff
from jaxexit.exits import offline, policies, risk, runners
from jaxexit.text import batches, glue, metrics
from jaxexit.text.model import EarlyExitModel


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


def policy_report(task: glue.Task, policy: policies.Policy, exits: runners.Exits, full_seconds: float | None,
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


def risk_report(task: glue.Task, policy: policies.Policy, outputs, labels, *, risk_name: str,
                tolerance: float | None = None) -> dict:
    """A setting on labelled inputs: its score, the full model's, the drop, the saving and the
    realised risk (the risk's mean there)."""
    metric = metrics.primary_scorer(task)
    row = offline.with_drop(offline.evaluate(policy, outputs, labels, metric).row(),
                            offline.full_score(outputs, labels, metric))
    events, _ = risk.risk_table([policy], outputs, risk_name, labels, tolerance)
    return {**row, "n": int(len(labels)), "risk": float(events[0].mean())}


def certify(task: glue.Task, name: str, cached, labels: np.ndarray | None, *, max_risk: float,
            delta: float = 0.1, risk_name: str = "consistency", method: str = "binomial",
            tolerance: float | None = None, fixed: dict | None = None, seed: int = 0,
            calibration=None) -> dict:
    """Certify policy `name`'s open parameters (those not in `fixed`) and report the setting.

    Without `calibration`: on a seeded random half of the labelled split `cached` / `labels`
    (`offline.split_halves`), reported on the other half. With `calibration` (ramp outputs of
    unlabelled inputs, consistency risk only): on all of them, reported on the whole split when
    `labels` are given. The result holds the certificate (`risk.Certificate.as_dict`), its one-line
    `summary`, where it was certified and the `report` row (`risk_report`; None without labels)."""
    if calibration is None:
        if labels is None:
            raise ValueError("certification on the split needs its labels (dev), or unlabelled "
                             "calibration inputs (--calibration-texts)")
        cal_rows, report_rows = halves = offline.split_halves(len(labels), seed)
        cal_outputs, cal_labels = offline.take(cached, cal_rows), np.asarray(labels)[cal_rows]
        report = (offline.take(cached, report_rows), np.asarray(labels)[report_rows])
        where = {"split_seed": seed, "halves": offline.describe_halves(halves, seed)}
    else:
        if risk_name == "drop":
            raise ValueError("the drop risk needs labels; unlabelled calibration inputs certify the "
                             "consistency risk only")
        cal_outputs, cal_labels = calibration, None
        report = None if labels is None else (cached, np.asarray(labels))
        where = {"calibration_inputs": int(offline.parts(calibration)[0].shape[1])}
    cert = risk.certify(name, cal_outputs, risk=risk_name, max_risk=max_risk, delta=delta,
                        labels=cal_labels if risk_name == "drop" else None, tolerance=tolerance,
                        method=method, fixed=fixed)
    row = None if report is None else risk_report(task, cert.policy, *report, risk_name=risk_name,
                                                  tolerance=tolerance)
    return {"certificate": cert.as_dict(), "summary": cert.describe(), "policy": cert.policy.as_dict(),
            "fixed": dict(fixed or {}), **where, "report": row}
