"""Offline evaluation of exit policies over cached ramp logits `[L, N, C]`.

One forward pass keeps every ramp's logits; then any policy at any grid of its parameters is
evaluated exactly: exit layers, predictions, efficiency (docs/policies.md's names: `avg_layers`,
`saving`, `speedup`), exit-layer histogram and task score; and a parameter is calibrated on one
split and reported on another.

Grids are evaluated in closed form from each policy's registry entry: its `measure` once per ramp,
then for every setting the first layer where its `fires` holds (patience through run lengths of the
per-layer condition). Tests pin this equal to stepping `policies.step` layer by layer.

Scores come from a caller's `metric(predictions, labels) -> float`, higher is better (accuracy,
F1, MCC, Pearson, Spearman). Predictions are the argmax for classification and the scalar for
regression (`C = 1`); with the cross-layer ensemble (`+ensemble`), of the mean of ramps 1..m.

Policies are named by their label everywhere here (`pcee`, `pcee[maxprob]`, `entropy+ensemble`;
`policies.parse_label`).

Cached ramp outputs are logits `[L, N, C]`, or on a model with a learning-to-exit module
`RampOutputs(logits, lte [L, N])` (what `runners.cached_logits` returns); every function here takes
either, and the learned policies (berxit, pcee[learned]) need the second.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxexit.exits import policies, registry
from jaxexit.exits.types import RampOutputs
from jaxexit.exits.policies import Policy

Metric = Callable[[np.ndarray, np.ndarray], float]

# Bound on one [settings, L, N] block of the closed form (~4M elements), so big dev sets
# (QQP: 40k rows) and big grids do not allocate gigabytes.
_BLOCK = 1 << 22
# Slack for comparing savings and score drops: 0.9 - 0.8 is 0.09999999999999998 in floats.
_TOL = 1e-9


# ---- cached outputs --------------------------------------------------------------------------------
def parts(outputs) -> tuple[np.ndarray, np.ndarray | None]:
    """`(logits [L, N, C], lte [L, N] or None)` as numpy arrays."""
    logits, lte = policies.split_outputs(outputs)
    return np.asarray(logits), None if lte is None else np.asarray(lte)


def take(outputs, rows):
    """The inputs `rows` (indices) of cached outputs, of either form."""
    logits, lte = parts(outputs)
    return logits[:, rows] if lte is None else RampOutputs(logits[:, rows], lte[:, rows])


# ---- efficiency and predictions ------------------------------------------------------------------
def efficiency(exit_layer, num_layers: int) -> dict:
    """`avg_layers = mean(m)`, `saving = 1 - avg_layers / L`, `speedup = L / avg_layers`."""
    avg_layers = float(np.mean(exit_layer))
    return {"avg_layers": avg_layers, "saving": 1.0 - avg_layers / num_layers, "speedup": num_layers / avg_layers}


def exit_histogram(exit_layer, num_layers: int) -> np.ndarray:
    """Number of inputs exiting at each layer `1..L` (index 0 is layer 1)."""
    return np.bincount(np.asarray(exit_layer) - 1, minlength=num_layers)


def ramp_predictions(outputs) -> np.ndarray:
    """Every ramp's predictions `[L, N]` from logits `[L, N, C]`."""
    return policies.prediction(parts(outputs)[0])


def ensemble_means(outputs) -> np.ndarray:
    """`[L, N, C]`: at layer m, the mean of ramps 1..m's probabilities (regression: outputs), summed
    in float32 layer by layer exactly as `policies.step` sums them live (`policies.output`)."""
    logits = parts(outputs)[0]
    acc, out = np.zeros(logits.shape[1:], np.float32), np.empty(logits.shape, np.float32)
    for m in range(len(logits)):
        acc = acc + policies.ensemble_term(logits[m])
        out[m] = acc / np.float32(m + 1)
    return out


def ensemble_predictions(outputs) -> np.ndarray:
    """`[L, N]`: at layer m, the prediction from the mean of ramps 1..m (`ensemble_means`)."""
    return policies.prediction(ensemble_means(outputs))


def exit_outputs(policy: Policy, outputs, exit_layer) -> np.ndarray:
    """What each row's prediction is made from `[N, C]` (as `policies.output` live): its exit
    ramp's logits, or with the ensemble the mean of ramps 1..m's probabilities (regression: outputs)."""
    chosen = ensemble_means(outputs) if policy.ensemble else parts(outputs)[0]
    return chosen[np.asarray(exit_layer) - 1, np.arange(chosen.shape[1])]


def _predictions(policy: Policy, logits, cache: dict) -> np.ndarray:
    """Every layer's predictions `[L, N]` as `policy` predicts (ensemble or not), computed once per
    `cache`."""
    key = "ensemble" if policy.ensemble else "ramps"
    if key not in cache:
        cache[key] = ensemble_predictions(logits) if policy.ensemble else ramp_predictions(logits)
    return cache[key]


def full_score(outputs, labels, metric: Metric) -> float:
    """The full model's score: ramp `L` for every input."""
    return float(metric(ramp_predictions(outputs)[-1], labels))


# ---- closed form over a grid of settings ---------------------------------------------------------
def _layer_measure(policy: Policy, logits: np.ndarray, lte: np.ndarray | None):
    """What a policy thresholds, for every ramp and row: `[L, N]` (None for static)."""
    if policy.needs_lte and lte is None:
        raise ValueError(policies.NEEDS_LTE.format(policy=policy.label))
    return registry.get(policy.name).measure(policy, logits, lte)


def _first_exit(fires: np.ndarray) -> np.ndarray:
    """First layer (1-based) whose condition holds, else L: `[G, N]`. Layer L's is ignored."""
    L = len(fires)
    exit_layer = np.full(fires.shape[1:], L, np.int64)
    for i in range(L - 2, -1, -1):  # from layer L-1 down, so the earliest layer is written last
        exit_layer[fires[i]] = i + 1
    return exit_layer


def _blocks(settings: Sequence[Policy], logits: np.ndarray, lte: np.ndarray | None
            ) -> Iterator[tuple[list[int], np.ndarray]]:
    """`(positions in settings, their exit layers [len(positions), N])`; each policy's measure once."""
    L, N, C = logits.shape
    for p in settings:
        if (p.num_layers, p.num_labels) != (L, C):
            raise ValueError(f"{p} is for L={p.num_layers}, C={p.num_labels}; logits are [L, N, C] = {logits.shape}")
    size = max(1, _BLOCK // max(1, L * N))
    kind = lambda p: (p.name, p.confidence)  # noqa: E731  (what decides exits; the ensemble does not)
    for name, confidence in dict.fromkeys(kind(p) for p in settings):
        group = [i for i, p in enumerate(settings) if kind(p) == (name, confidence)]
        measure = _layer_measure(settings[group[0]], logits, lte)
        for start in range(0, len(group), size):
            positions = group[start:start + size]
            block = [settings[i] for i in positions]
            yield positions, _first_exit(registry.get(name).fires(block, measure, L, N))


def exit_layers(settings: Policy | Sequence[Policy], outputs) -> np.ndarray:
    """Exit layers (1-based) for one policy `[N]` or for a list of settings `[G, N]` (any mix)."""
    if isinstance(settings, Policy):
        return exit_layers([settings], outputs)[0]
    logits, lte = parts(outputs)
    out = np.empty((len(settings), logits.shape[1]), np.int64)
    for positions, layers in _blocks(list(settings), logits, lte):
        out[positions] = layers
    return out


# ---- evaluating settings -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One policy setting on one split."""

    policy: Policy
    exit_layer: np.ndarray  # [N], 1-based
    prediction: np.ndarray  # [N], from ramp exit_layer
    histogram: np.ndarray   # [L], inputs exiting at layers 1..L
    avg_layers: float
    saving: float
    speedup: float
    score: float | None     # None without a metric

    def row(self) -> dict:
        return _row(self.policy, self.score, self.exit_layer, self.histogram)


def _row(policy: Policy, score, exit_layer, histogram) -> dict:
    return {"policy": policy.label, "params": dict(policy.params), "score": score,
            **efficiency(exit_layer, policy.num_layers), "exit_histogram": histogram.tolist()}


def _score(metric: Metric | None, prediction, labels):
    if metric is None:
        return None
    if labels is None:
        raise ValueError("a metric needs labels")
    return float(metric(prediction, labels))


def evaluate(policy: Policy, outputs, labels=None, metric: Metric | None = None) -> Evaluation:
    """Exit layers, predictions, efficiency, histogram and (with `metric`) score of one setting."""
    logits = parts(outputs)[0]
    exit_layer = exit_layers(policy, outputs)
    prediction = _predictions(policy, logits, {})[exit_layer - 1, np.arange(logits.shape[1])]
    eff = efficiency(exit_layer, policy.num_layers)
    return Evaluation(policy, exit_layer, prediction, exit_histogram(exit_layer, policy.num_layers),
                      eff["avg_layers"], eff["saving"], eff["speedup"], _score(metric, prediction, labels))


def default_grid(label: str, num_layers: int, num_labels: int) -> list[dict]:
    """Parameter settings spanning a policy's trade-off curve (papers' figures).

    Threshold grids are spaced quadratically, denser where fine-tuned ramps' confidences sit
    (entropy near 0, max probability near 1); each includes the setting that reproduces the full
    model (S = 0, tau = 0, t = 1, margin = 1, pabee patience = L, static k = L; pcee[maxprob]:
    tau = 1).
    The ensemble option does not change a grid.
    """
    name, confidence, _ = policies.parse_label(label)
    spec = registry.get(name)
    if spec.softmax and num_labels == 1:
        raise ValueError(f"policy {name!r} does not apply to regression (num_labels=1)")
    return spec.grid(num_layers, num_labels, confidence)


def applicable(num_labels: int, lte: bool = False) -> tuple[str, ...]:
    """Policies that apply to a task with `num_labels` outputs (berxit: with a learning-to-exit module)."""
    return tuple(n for n, spec in registry.REGISTRY.items()
                 if (num_labels > 1 or not spec.softmax) and (lte or not spec.needs_lte))


def sweep(outputs, labels=None, metric: Metric | None = None,
          grids: Mapping[str, Sequence[Mapping] | None] | None = None) -> list[dict]:
    """Evaluate every setting of every policy's grid; one row per setting, in grid order.

    `grids` maps a policy name to its parameter settings (None: `default_grid`); by default every
    policy that applies to the task. Rows: `{"policy", "params", "score", "avg_layers", "saving",
    "speedup", "exit_histogram"}`.
    """
    logits, lte = parts(outputs)
    L, N, C = logits.shape
    if grids is None:
        grids = dict.fromkeys(applicable(C, lte is not None))
    settings = [policies.make_policy(label, L, C, **params)
                for label, grid in grids.items()
                for params in (default_grid(label, L, C) if grid is None else grid)]
    cache, rows = {}, [None] * len(settings)
    for positions, layers in _blocks(settings, logits, lte):
        for i, exit_layer in zip(positions, layers):
            prediction = _predictions(settings[i], logits, cache)[exit_layer - 1, np.arange(N)]
            rows[i] = _row(settings[i], _score(metric, prediction, labels), exit_layer, exit_histogram(exit_layer, L))
    return rows


# ---- calibration ---------------------------------------------------------------------------------
def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of `n` inputs into a calibration half (`n // 2` inputs) and a report
    half (the rest), each in increasing order. GLUE dev files are ordered by source (CoLA's by
    publication), so contiguous halves would differ in kind."""
    if n < 2:
        raise ValueError(f"calibration needs at least 2 labelled inputs, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def calibration_grid(name: str, num_layers: int, num_labels: int, fixed: Mapping | None = None) -> list[dict]:
    """`name`'s default grid with the parameters in `fixed` held at their given values: only the
    others are searched. Raises ValueError for a parameter the policy does not take, an invalid
    value, or nothing left to search."""
    fixed = dict(fixed or {})
    grid = default_grid(name, num_layers, num_labels)  # refuses unknown policies and regression first
    base, confidence, _ = policies.parse_label(name)
    spec = registry.get(base)
    if spec.calibration_grid is not None:
        grid = spec.calibration_grid(num_layers, num_labels, confidence)
    names = policies.param_names(base, num_labels)
    wrong = sorted(set(fixed) - set(names))
    if wrong:
        raise ValueError(f"policy {name!r} takes {', '.join(names)}; {', '.join(wrong)} cannot apply to it")
    searched = [k for k in names if k not in fixed]
    if not searched:
        raise ValueError(f"every parameter of {name!r} is fixed ({', '.join(f'{k}={v}' for k, v in fixed.items())}): "
                         "nothing is left to calibrate; leave one open or drop the calibration target")
    settings = {tuple(sorted({**g, **fixed}.items())): None for g in grid}
    out = [dict(k) for k in settings]
    policies.make_policy(name, num_layers, num_labels, **out[0])  # validates the fixed values
    return out


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A setting chosen on a calibration split, with its rows there and on a held-out split.

    Rows are `sweep` rows plus `full_score` (ramp L on that split) and `drop = full_score - score`.
    `fixed` are the parameters held at the caller's values; `chosen` the ones the search picked.
    """

    policy: Policy
    rule: str
    calibration: dict
    heldout: dict | None
    fixed: dict = dataclasses.field(default_factory=dict)
    chosen: dict = dataclasses.field(default_factory=dict)


SAVING_BAND = 0.05  # near_saving: settings within this much saving of the target compete on score


def calibrate(name: str, outputs, labels, metric: Metric, *, target_saving: float | None = None,
              max_drop: float | None = None, near_saving: float | None = None, grid: Sequence[Mapping] | None = None,
              fixed: Mapping | None = None, heldout: tuple | None = None) -> Calibration:
    """Choose policy `name`'s setting on a calibration split; report it on `heldout=(logits, labels)`.

    The search runs over `grid` (default: `calibration_grid(name, L, C, fixed)`, the default grid
    with the parameters in `fixed` held at their values). Exactly one rule:
    * `target_saving`: the highest-scoring setting whose `saving >= target_saving`
      (ties: higher saving, then earlier in the grid);
    * `max_drop`: the setting with the largest `saving` whose score drop below the full model,
      `full_score - score`, is at most `max_drop` in the metric's units (ties: higher score, then
      earlier in the grid);
    * `near_saving`: the highest-scoring setting whose saving is within `SAVING_BAND` of
      `near_saving` (policies compared at about the same speed-up, as PCEE-BERT compares them at
      PABEE's; ties: nearer saving, then earlier in the grid); if none is, the setting nearest it.
    Comparisons allow 1e-9 of float slack. Raises ValueError if no grid setting qualifies.
    """
    if sum(rule is not None for rule in (target_saving, max_drop, near_saving)) != 1:
        raise ValueError("give exactly one of target_saving, max_drop and near_saving")
    for key, value in (("target_saving", target_saving), ("near_saving", near_saving)):
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {value}")
    if max_drop is not None and not max_drop >= 0.0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    if metric is None or labels is None:
        raise ValueError("calibration needs labels and a metric")
    L, _, C = parts(outputs)[0].shape
    fixed = dict(fixed or {})
    if grid is None:
        grid = calibration_grid(name, L, C, fixed)
    elif fixed:
        raise ValueError("give a grid or fixed parameters, not both")
    full = full_score(outputs, labels, metric)
    rows = [with_drop(r, full) for r in sweep(outputs, labels, metric, {name: grid})]
    index, rule = choose(rows, target_saving=target_saving, max_drop=max_drop, near_saving=near_saving, name=name)
    chosen = rows[index]
    policy = policies.make_policy(name, L, C, **chosen["params"])
    report = None
    if heldout is not None:
        held_logits, held_labels = heldout
        held_full = full_score(held_logits, held_labels, metric)
        report = with_drop(evaluate(policy, held_logits, held_labels, metric).row(), held_full)
    picked = {k: v for k, v in policy.params if k not in fixed}
    return Calibration(policy, rule, chosen, report, {k: policy[k] for k in fixed}, picked)


def choose(rows: Sequence[Mapping], *, target_saving: float | None = None, max_drop: float | None = None,
           near_saving: float | None = None, name: str = "policy") -> tuple[int, str]:
    """`calibrate`'s rule over evaluated rows (`sweep` rows with `drop`, as `calibrate` builds them):
    (index of the chosen row, the rule in words). Exactly one rule; see `calibrate`. Raises
    ValueError if no row qualifies."""
    if sum(rule is not None for rule in (target_saving, max_drop, near_saving)) != 1:
        raise ValueError("give exactly one of target_saving, max_drop and near_saving")
    if near_saving is not None:
        gap = [abs(r["saving"] - near_saving) for r in rows]
        ok = [i for i in range(len(rows)) if gap[i] <= SAVING_BAND + _TOL]
        rule = f"max score s.t. |saving - {near_saving}| <= {SAVING_BAND}"
        if not ok:
            ok, rule = list(range(len(rows))), f"saving nearest {near_saving} (none within {SAVING_BAND})"
            key = lambda i: (-gap[i], rows[i]["score"], -i)  # noqa: E731
        else:
            key = lambda i: (rows[i]["score"], -gap[i], -i)  # noqa: E731
        why = "the grid is empty"
    elif target_saving is not None:
        rule = f"max score s.t. saving >= {target_saving}"
        ok = [i for i, r in enumerate(rows) if r["saving"] >= target_saving - _TOL]
        key = lambda i: (rows[i]["score"], rows[i]["saving"], -i)  # noqa: E731
        best = max((r["saving"] for r in rows), default=None)
        why = f"the largest saving in the grid is {best}"
    else:
        rule = f"max saving s.t. full_score - score <= {max_drop}"
        ok = [i for i, r in enumerate(rows) if r["drop"] <= max_drop + _TOL]
        key = lambda i: (rows[i]["saving"], rows[i]["score"], -i)  # noqa: E731
        best = min((r["drop"] for r in rows), default=None)
        why = f"the smallest drop in the grid is {best}"
    if not ok:
        raise ValueError(f"no {name} setting meets '{rule}' on the calibration split; {why}")
    return max(ok, key=key), rule


def calibrate_on_halves(name: str, outputs, labels, metric: Metric, halves: tuple, **rule) -> Calibration:
    """`calibrate` on the calibration half `halves[0]`, reported on the report half `halves[1]`
    (index arrays from `split_halves`); `rule` is calibrate's keyword arguments."""
    cal_rows, report_rows = halves
    labels = np.asarray(labels)
    return calibrate(name, take(outputs, cal_rows), labels[cal_rows], metric,
                     heldout=(take(outputs, report_rows), labels[report_rows]), **rule)


def describe_halves(halves: tuple, seed: int) -> str:
    """Which inputs a calibration was chosen and reported on, for result files and summaries."""
    cal_rows, report_rows = halves
    return (f"chosen on a random half of the {len(cal_rows) + len(report_rows)} inputs ({len(cal_rows)}, "
            f"split seed {seed}), reported on the other {len(report_rows)}")


def with_drop(row: dict, full: float) -> dict:
    """A sweep row with the full model's score on the same inputs and `drop = full_score - score`."""
    return {**row, "full_score": full, "drop": full - row["score"]}
