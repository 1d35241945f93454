"""Markdown tables gathered over runs' `analysis.json` (`tables`): DeeBERT Table 1, PCEE-BERT
Tables 2 and 3, its ablations and coverage, per-layer scores; the mean and standard deviation over
seeds where a task and setup were trained with several seeds."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from jaxexit.analysis.compute import DEEBERT_DROPS, TARGET_SAVINGS


def _pts(values: list[float]) -> str:
    """Points (x100): the value, or mean ± standard deviation over seeds."""
    values = [100 * v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _setup(analysis: dict) -> str:
    """The run's name without a `-s<seed>` suffix: runs named `<setup>-s<seed>` (as
    results/train_minilm.sh names them) are seeds of `<setup>`."""
    return re.sub(r"-s\d+$", "", Path(analysis["checkpoint"]).name)


def _group(analyses: list[dict], scheme: str) -> dict[str, list[dict]]:
    """Runs of `scheme` by task, and by setup (shown with the task) where a task has several."""
    runs = [a for a in analyses if a["scheme"] == scheme]
    setups = defaultdict(set)
    for a in runs:
        setups[a["tsv_dir"]].add(_setup(a))
    groups = defaultdict(list)
    for a in runs:
        label = a["tsv_dir"] if len(setups[a["tsv_dir"]]) == 1 else f"{a['tsv_dir']} `{_setup(a)}`"
        if a["split"] != "validation":  # MNLI's matched and mismatched, side by side
            label += " " + a["split"].removeprefix("validation_")
        groups[label].append(a)
    return dict(groups)


def _cell(rows: list[dict | None]) -> str:
    rows = [r for r in rows if r is not None]
    if not rows or any("note" in r for r in rows):
        return "n/a"
    return f"{_pts([r['score'] for r in rows])} ({_pts([r['saving'] for r in rows])}%)"


def _wall_saving(analysis: dict, row: dict) -> float | None:
    """The measured wall saving of a chosen setting (latency mode), if it was timed."""
    for t in analysis.get("timing", {}).get("settings", []):
        if t["policy"] == row.get("policy") and t["params"] == row.get("params"):
            return t["wall_saving"]
    return None


def _deebert_cell(runs: list[dict], drop: float) -> str:
    rows = [next(r for r in a["deebert"] if r["max_drop"] == drop) for a in runs]
    cell = _cell(rows)
    walls = [_wall_saving(a, r) for a, r in zip(runs, rows)]
    if cell != "n/a" and all(w is not None for w in walls):
        cell = cell[:-1] + f", wall {_pts(walls)}%)"
    return cell


_SAVING_HEADER = ["| policy | " + " | ".join(f"saving near {int(t * 100)}% on the calibration half"
                                              for t in TARGET_SAVINGS) + " |", "|---|" + "---|" * len(TARGET_SAVINGS)]


def _saving_row(label: str, runs: list[dict], key: str, note: str = "") -> str:
    """One policy's cells at the Table 2 savings, from each run's `key` rows (mean ± sd over runs)."""
    cells = [_cell([next((r for r in a.get(key, []) if r["policy"] == label and r["near_saving"] == t), None)
                    for a in runs]) for t in TARGET_SAVINGS]
    return f"| {label}{note} | " + " | ".join(cells) + " |"


def _ablation_tables(groups: dict[str, list[dict]], scheme: str) -> list[str]:
    """PCEE-BERT's ablations at the Table 2 savings: confidence variants (Figure 4) and each policy
    with and without the ensemble (Figure 6). Runs analysed before these existed are skipped."""
    out = []
    for key, title in (("variants", "PCEE-BERT Figure 4 form: confidence variants (pcee = PCEE-BERT, "
                                    "pcee[maxprob] = -v1, pcee[learned] = -v2)"),
                       ("ensemble", "PCEE-BERT Figure 6 form: each policy with and without the cross-layer ensemble")):
        for task, runs in sorted(groups.items()):
            labels = list(dict.fromkeys(r["policy"] for r in runs[0].get(key, [])))
            if len(labels) < 2:
                continue
            out += [f"### {title} ({scheme} checkpoints)", "", f"{task}, {len(runs)} seed(s):", ""] + _SAVING_HEADER
            out += [_saving_row(label, runs, key) for label in labels] + [""]
    return out


def _coverage_rows(groups: dict[str, list[dict]]) -> list[str]:
    """PCEE-BERT Figure 8's claim in numbers: per patience, the savings tau reaches and the largest
    jump between neighbouring taus; PABEE's reachable savings (first seed of each setup)."""
    out = []
    for task, runs in sorted(groups.items()):
        curves = runs[0].get("pcee_curves")
        if not curves:
            continue
        pcee = "; ".join(f"p={c['patience']}: {100 * min(c['saving']):.0f}-{100 * max(c['saving']):.0f}% "
                         f"(step <= {100 * c['largest_step']:.1f})" for c in curves["curves"])
        pabee = ", ".join(f"{100 * r['saving']:.0f}" for r in sorted(curves["pabee"], key=lambda r: r["saving"]))
        out.append(f"| {task} | {pcee} | {pabee} |")
    if out:
        out = ["| task | PCEE: savings over tau in [0, 1] (largest jump between taus 0.01 apart), % | "
               "PABEE: the only savings it reaches, % |", "|---|---|---|"] + out + [""]
    return out


def tables(analyses: list[dict], command: str = "") -> str:
    """Markdown: DeeBERT Table 1 (two_stage runs), PCEE-BERT Table 2 (joint runs), per-layer scores."""
    out = []
    if command:
        out += [f"Made by: `{command}`", ""]
    for a in analyses:
        if "split_seed" not in a:
            raise ValueError(f"the analysis of {a['checkpoint']} predates seeded calibration halves "
                             "(thresholds chosen on contiguous halves); run infer/analyze.py on it again")
    sizes = sorted({(a["tsv_dir"], a["split"], a["calibration_n"], a["report_n"], a["split_seed"]) for a in analyses})
    halves = "; ".join(f"{task} {split}: {c} calibration / {r} report inputs, split seed {seed}"
                       for task, split, c, r, seed in sizes)
    out += ["Every threshold is chosen on the calibration half of dev (of test for images; a seeded random half) and every "
            f"score and saving below is measured on the other half, the report half ({halves}). "
            "Scores in points of the task's metric; cells are `score (saving %)`; `a ± b` is the mean and "
            "standard deviation over seeds.", ""]
    for scheme in sorted({a["scheme"] for a in analyses}):
        groups = _group(analyses, scheme)
        out += [f"### DeeBERT Table 1 form ({scheme} checkpoints)", "",
                "Largest saving whose drop on the calibration half is at most the column's; `wall` is the "
                "measured wall saving of that setting in latency mode (batch 1, on up to "
                f"{runs_timed(analyses)} report-half inputs{timing_rounds(analyses)}).", "",
                "| task (metric, policy) | seeds | full model | "
                + " | ".join(f"drop {'<' if d == DEEBERT_DROPS[0] else '<='} {100 * d:g}" for d in DEEBERT_DROPS)
                + " |", "|---|---|---|" + "---|" * len(DEEBERT_DROPS)]
        for task, runs in sorted(groups.items()):
            cells = [_deebert_cell(runs, d) for d in DEEBERT_DROPS]
            policy = runs[0]["deebert"][0]["policy"]
            out.append(f"| {task} ({runs[0]['metric']}, {policy}) | {len(runs)} | "
                       f"{_pts([a['full_score_report'] for a in runs])} | " + " | ".join(cells) + " |")
        out.append("")
        out += [f"### PCEE-BERT Table 2 form ({scheme} checkpoints)", ""]
        for task, runs in sorted(groups.items()):
            out += [f"{task} ({runs[0]['metric']}), full model {_pts([a['full_score_report'] for a in runs])}, "
                    f"{len(runs)} seed(s):", ""] + _SAVING_HEADER
            out += [_saving_row(name, runs, "pcee", " (reference)" if name == "static" else "")
                    for name in dict.fromkeys(r["policy"] for r in runs[0]["pcee"])]
            out.append("")
        out += _ablation_tables(groups, scheme)
        coverage = _coverage_rows(groups)
        if coverage:
            out += [f"### PCEE-BERT Figure 8 form: which savings each policy reaches ({scheme} checkpoints, "
                    "whole dev)", ""] + coverage
        depth = max(a["num_layers"] for runs in groups.values() for a in runs)
        out += [f"### Per-layer score ({scheme} checkpoints, whole dev)", "",
                "| task (metric) | " + " | ".join(f"ramp {i + 1}" for i in range(depth)) + " |",
                "|---|" + "---|" * depth]
        for task, runs in sorted(groups.items()):
            metric = runs[0]["metric"]
            cols = [_pts([a["per_layer"][i][metric] for a in runs]) for i in range(runs[0]["num_layers"])]
            out.append(f"| {task} ({metric}) | " + " | ".join(cols + [""] * (depth - len(cols))) + " |")
        out.append("")
    out += _table3(analyses)
    return "\n".join(out)


def _table3(analyses: list[dict]) -> list[str]:
    """PCEE-BERT Table 3 form (its section 4.6.4): on a multi-exit ResNet, PABEE against PCEE at the
    savings nearest 75%, 50% and 25%, beside the full network."""
    runs = [a for a in analyses if str(a.get("model", "")).startswith("resnet")]
    if not runs:
        return []
    targets = sorted(TARGET_SAVINGS, reverse=True)
    out = ["### PCEE-BERT Table 3 form: PABEE against PCEE on the multi-exit ResNet", "",
           "Test accuracy on the report half (thresholds chosen on the calibration half of test); cells are "
           "`accuracy (saving %)`, the saving (PCEE-BERT's speed-up ratio) nearest the column's.", "",
           "| dataset, model | full network | " + " | ".join(f"{p} ~{int(t * 100)}%" for t in targets
                                                            for p in ("PABEE", "PCEE")) + " |",
           "|---|---|" + "---|" * (2 * len(targets))]
    for (task, model), group in sorted(_by(runs, lambda a: (a["tsv_dir"], a["model"])).items()):
        cells = [_cell([next((r for r in a["pcee"] if r["policy"] == p and r["near_saving"] == t), None)
                        for a in group]) for t in targets for p in ("pabee", "pcee")]
        out.append(f"| {task}, {model} | {_pts([a['full_score_report'] for a in group])} | " + " | ".join(cells) + " |")
    return out + [""]


def _by(items, key) -> dict:
    groups = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return dict(groups)


def runs_timed(analyses: list[dict]) -> int:
    return max((a.get("timing", {}).get("inputs", 0) for a in analyses), default=0)


def timing_rounds(analyses: list[dict]) -> str:
    """How the `wall` cells were timed, for the Table 1 caption (analyses older than the paired
    rounds of `wall_savings` hold one measurement each)."""
    rounds = sorted({a["timing"].get("rounds", 1) for a in analyses if "timing" in a})
    if not rounds or rounds == [1]:
        return ""
    older = "; analyses without rounds: one measurement" if 1 in rounds else ""
    return (f"; the median over {'/'.join(map(str, (r for r in rounds if r > 1)))} rounds, each timing the "
            f"setting right after the full model{older}")


def load_analyses(paths) -> list[dict]:
    found = []
    for p in map(Path, paths):
        files = sorted(p.rglob("analysis.json")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"no analysis.json under {p}")
        found += [json.loads(f.read_text()) for f in files]
    return found


# ---- certified exit settings (`jaxexit.analysis.risk`) ------------------------------------------------
def _setting(row: dict) -> str:
    if row["full_model"]:
        return "full model"
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())


def risk_tables(result: dict, title: str) -> str:
    """Markdown of one run's `jaxexit.analysis.risk.analyze`: the certified table, then the violations."""
    delta, tol = result["risk_delta"], result["tolerance"]
    out = [f"## Certified exit settings: {title}", ""]
    if result.get("command"):
        out += [f"Made by: `{result['command']}`", ""]
    out += [f"Each setting is chosen on the calibration half ({result['calibration_n']} inputs, split seed "
            f"{result['split_seed']}) and measured on the report half ({result['report_n']}). *Certified*: "
            f"Learn then Test ({result['method']} p-values, delta {delta}): with probability >= {1 - delta:g} "
            "its risk on new inputs is <= eps; `bound` is its upper confidence bound. *Today's rule*: the "
            "largest calibration saving whose calibration risk is <= eps, no guarantee. Risks: `consistency` = the "
            "exit's prediction differs from the full model's (no labels), `drop` = the full model right and the "
            "exit wrong" + (f"; regression: outputs more than {tol:g} apart differ" if tol is not None else "")
            + ". Cells in %.", ""]
    for risk in result["risks"]:
        out += [f"### {risk} risk, report half", "",
                "| policy | eps | certified setting | bound | cal. saving | report risk | report saving | "
                "today's rule setting | report risk | report saving |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["table"] if r["risk"] == risk):
            c, n = r["certified"], r["naive"]
            flag = " **>eps**" if n["report_risk"] > r["max_risk"] + 1e-12 else ""
            out.append(f"| {r['policy']} | {100 * r['max_risk']:g} | {_setting(c)} | {100 * c['bound']:.2f} | "
                       f"{100 * c['calibration_saving']:.1f} | {100 * c['report_risk']:.2f} | "
                       f"{100 * c['report_saving']:.1f} | {_setting(n)} | {100 * n['report_risk']:.2f}{flag} | "
                       f"{100 * n['report_saving']:.1f} |")
        out.append("")
    v = result["violations"]
    out += [f"### Broken promises over {v['splits']} random halves (seeds {v['seeds'][0]}..{v['seeds'][1]}), "
            "consistency risk", "",
            "A violation: the report half's realised risk above eps (`report`), or the chosen setting's risk "
            "on the whole split, the population the halves are drawn from, above eps (`split`: what the "
            f"certificate is about; the certified rule promises it in at most {100 * delta:g}% of splits). The "
            "report half adds its own sampling noise and, as the complement of a half chosen for few events, "
            "leans above the split's risk. `certified in`: splits where any setting was certified (else the "
            "full model). Savings: mean over splits, on the report half.", "",
            "| policy | eps | today's rule: report | split | mean saving | certified: report | split | "
            "mean saving | certified in |", "|---|---|---|---|---|---|---|---|---|"]
    for r in v["rows"]:
        n, c = r["naive"], r["certified"]
        out.append(f"| {r['policy']} | {100 * r['max_risk']:g} | {100 * n['rate']:.0f}% | "
                   f"{100 * n['population_rate']:.0f}% | {100 * n['mean_report_saving']:.1f} | "
                   f"{100 * c['rate']:.0f}% | {100 * c['population_rate']:.0f}% | "
                   f"{100 * c['mean_report_saving']:.1f} | {c['splits_certified']}/{r['splits']} |")
    return "\n".join(out) + "\n"
