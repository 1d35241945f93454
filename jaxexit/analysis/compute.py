"""The numbers of one run's analysis, from its cached ramp outputs on a labelled split: the
DeeBERT and PCEE-BERT table rows (each threshold chosen on the calibration half, reported on the
other), PCEE's coverage curves, the exit histograms' settings, and paired wall-saving timings.
`jaxexit.analysis.report` writes them out; docs/analysis.md describes each."""

from __future__ import annotations

import math

import numpy as np

from jaxexit.exits import offline, policies, runners
from jaxexit.exits.types import RampModel
from jaxexit.text import metrics

TARGET_SAVINGS = (0.25, 0.5, 0.75)  # Table 2: each policy at about these savings (offline.SAVING_BAND)
DEEBERT_DROPS = (0.005, 0.01, 0.04)  # under 0.5 point; within 1 point; within 4 (the "2-4 point" regime)
PCEE_FIGURE_PATIENCE = (1, 2, 3, 6)  # PCEE-BERT Figure 8 (12 layers); those below L are drawn
PCEE_FIGURE_TAUS = tuple(round(float(t), 2) for t in np.linspace(0.0, 1.0, 101))
HISTOGRAM_LEVELS = (0.1, 0.3, 0.6, 0.9)  # entropy thresholds as fractions of ln C


def _calibrated(name, logits, labels, metric, halves, **rule) -> dict:
    """Calibrate on the calibration half, report on the report half; a row with `note` if no
    setting qualifies."""
    try:
        cal = offline.calibrate_on_halves(name, logits, labels, metric, halves, **rule)
    except ValueError as e:
        return {"policy": name, "note": str(e)}
    held = cal.heldout
    return {"policy": name, "params": dict(cal.policy.params), "rule": cal.rule, "score": held["score"],
            "drop": held["drop"], "saving": held["saving"], "avg_layers": held["avg_layers"],
            "calibration_saving": cal.calibration["saving"], "calibration_drop": cal.calibration["drop"],
            "exit_histogram": held["exit_histogram"]}


def deebert_rows(task, logits, labels, halves) -> list[dict]:
    name = "pabee" if task.is_regression else "entropy"
    return [{"max_drop": d, **_calibrated(name, logits, labels, metrics.primary_scorer(task), halves, max_drop=d)}
            for d in DEEBERT_DROPS]


def _near_saving_rows(task, outputs, labels, halves, names) -> list[dict]:
    """Each policy of `names` calibrated near each of the Table 2 savings."""
    return [{"near_saving": t, **_calibrated(name, outputs, labels, metrics.primary_scorer(task), halves,
                                             near_saving=t)}
            for name in names for t in TARGET_SAVINGS]


def _applicable(outputs) -> tuple[str, ...]:
    logits, lte = offline.parts(outputs)
    return offline.applicable(logits.shape[2], lte is not None)


def pcee_rows(task, outputs, labels, halves) -> list[dict]:
    return _near_saving_rows(task, outputs, labels, halves, _applicable(outputs))


def variant_labels(num_labels: int, lte: bool) -> list[str]:
    """PCEE-BERT and its confidence variants (section 4.6.1) that apply: -v1 needs a softmax, -v2 an LTE."""
    if num_labels == 1:
        return ["pcee[learned]"] if lte else []
    return ["pcee", "pcee[maxprob]"] + (["pcee[learned]"] if lte else [])


def variant_rows(task, outputs, labels, halves) -> list[dict]:
    logits, lte = offline.parts(outputs)
    return _near_saving_rows(task, outputs, labels, halves, variant_labels(logits.shape[2], lte is not None))


def ensemble_labels(outputs) -> list[str]:
    """Every policy that applies, each with and without the cross-layer ensemble."""
    return [label for name in _applicable(outputs) for label in (name, name + "+ensemble")]


def ensemble_rows(task, outputs, labels, halves) -> list[dict]:
    """Every policy with and without the cross-layer ensemble at the Table 2 savings."""
    return _near_saving_rows(task, outputs, labels, halves, ensemble_labels(outputs))


def histogram_settings(num_layers: int, num_labels: int) -> list[policies.Policy]:
    """Figure 6's thresholds: entropy at fractions of ln C; pabee patience 1..L-1 for regression."""
    if num_labels == 1:
        return [policies.make_policy("pabee", num_layers, 1, patience=p, delta=0.1) for p in range(1, num_layers)]
    return [policies.make_policy("entropy", num_layers, num_labels, S=round(f * math.log(num_labels), 4))
            for f in HISTOGRAM_LEVELS]


def pcee_curves(logits, labels, metric) -> dict | None:
    """PCEE-BERT Figures 7 and 8 on the whole split (nothing is chosen, so nothing is held out):
    for each patience, score, saving and average exit layer at every tau of a 0.01 grid, and the
    largest saving jump between neighbouring taus (small: any saving in the range is reachable);
    PABEE's reachable savings (one per patience) beside it. None for regression (no entropy)."""
    L, _, C = logits.shape
    if C == 1:
        return None
    patience = [p for p in PCEE_FIGURE_PATIENCE if p < L]
    grid = [{"patience": p, "tau": t} for p in patience for t in PCEE_FIGURE_TAUS]
    rows = offline.sweep(logits, labels, metric, {"pcee": grid})
    curves = []
    for i, p in enumerate(patience):
        part = rows[i * len(PCEE_FIGURE_TAUS):(i + 1) * len(PCEE_FIGURE_TAUS)]
        saving = [r["saving"] for r in part]
        curves.append({"patience": p, "score": [r["score"] for r in part], "saving": saving,
                       "avg_layers": [r["avg_layers"] for r in part],
                       "largest_step": max(abs(b - a) for a, b in zip(saving, saving[1:]))})
    pabee = [{"params": r["params"], "score": r["score"], "saving": r["saving"]}
             for r in offline.sweep(logits, labels, metric, {"pabee": None})]
    return {"taus": list(PCEE_FIGURE_TAUS), "curves": curves, "pabee": pabee}


TIMING_ROUNDS = 3


def wall_savings(model: RampModel, split, settings: list[policies.Policy], full_latency=runners.run_full_latency,
                 latency=runners.run_latency, rounds: int = TIMING_ROUNDS) -> dict:
    """Latency mode (batch 1) on the same inputs (`split`, as `full_latency(model, split)` and
    `latency(model, policy, split)` take them): in each of `rounds` rounds, every setting is timed
    right after the full model, and its `wall_saving` is 1 - the median over rounds of the paired
    ratio (setting / full), so a slow spell of a shared machine moves both sides of a pair
    together; `seconds` and `full_model_seconds` are medians too."""
    fulls, times, exit_layers = [], [[] for _ in settings], [None] * len(settings)
    for _ in range(rounds):
        for i, policy in enumerate(settings):
            fulls.append(full_latency(model, split)[1])
            exits = latency(model, policy, split)
            times[i].append(exits.seconds)
            exit_layers[i] = exits.exit_layer  # the same every round
    rows = []
    for i, policy in enumerate(settings):
        paired = np.asarray(times[i]) / np.asarray(fulls[i::len(settings)])
        saving = offline.efficiency(exit_layers[i], model.num_layers)["saving"]
        rows.append({"policy": policy.name, "params": dict(policy.params), "saving": saving,
                     "seconds": float(np.median(times[i])), "wall_saving": float(1.0 - np.median(paired)),
                     "wall_saving_rounds": [float(w) for w in 1.0 - paired]})
    return {"inputs": len(split), "rounds": rounds, "full_model_seconds": float(np.median(fulls)), "settings": rows}
