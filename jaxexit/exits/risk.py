"""Risk-controlled calibration (Learn then Test): exit settings whose risk is certified on data.

A *risk* is a per-input event in {0, 1} whose mean the user bounds (docs/policies.md, "Certified
settings" says why these and not a difference of scores):

* `consistency`: the exit's prediction differs from the full model's (ramp L). Needs no labels, so
  unlabelled in-domain text or the service's own traffic calibrates it. Regression: the two
  outputs differ by more than a `tolerance` the user gives.
* `drop`: the full model is right and the exit is wrong (regression: right = within `tolerance` of
  the label). Its mean bounds the accuracy drop from above (the drop is P(full right, exit wrong)
  - P(full wrong, exit right)).

Learn then Test (Angelopoulos, Bates et al. 2021) turns "the risk of setting s is at most eps"
into a family of hypotheses H_s: risk(s) > eps, each with a valid p-value on n calibration inputs:
the exact binomial tail P(Binom(n, eps) <= k) for k risk events (`binomial`), or Hoeffding-Bentkus
(`hb`, CALM's choice). A policy's settings are ordered from the safest (saving 0) outward along its
last open parameter (the registry's `faster` says which way saves), so the order is fixed before
any data is seen, and tested in that fixed sequence at level delta, stopping at the first setting
not rejected. Every rejected setting has risk <= eps with probability >= 1 - delta; of those, the
one with the largest saving on the calibration inputs is chosen. With two open parameters (pcee's
patience x tau, pabee's patience x delta for regression) each value of the first is its own
sequence, tested at delta / (number of sequences) (Bonferroni), so the guarantee holds over all of
them. Nothing rejected (too few inputs, or eps below what any exit reaches): the full model.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Mapping, Sequence

import numpy as np

from jaxexit.exits import offline, policies, registry
from jaxexit.exits.policies import Policy

RISKS = ("consistency", "drop")
BOUNDS = ("binomial", "hb")  # the exact binomial tail; Hoeffding-Bentkus


# ---- p-values and bounds ---------------------------------------------------------------------------
def _check_level(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def binomial_cdf(k, n: int, eps: float) -> np.ndarray:
    """P(Binom(n, eps) <= k) for each k (array), summed in log space from the pmf
    (log C(n, i) accumulated as sum log((n - i + 1) / i)), exact to float rounding."""
    k = np.asarray(k, np.int64)
    if n == 0:
        return np.ones(k.shape)
    top = int(min(n, max(0, k.max(initial=0))))
    i = np.arange(1, top + 1)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - i + 1.0) - np.log(i))])
    log_pmf = log_choose + np.arange(top + 1) * math.log(eps) + (n - np.arange(top + 1)) * math.log1p(-eps)
    log_cdf = np.logaddexp.accumulate(log_pmf)
    return np.minimum(1.0, np.exp(log_cdf[np.clip(k, 0, top)]))


def _kl(a: np.ndarray, b: float) -> np.ndarray:
    """Bernoulli KL divergence h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)), 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.where(a > 0, a * np.log(a / b), 0.0)
        right = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
    return left + right


def p_values(k, n: int, eps: float, bound: str = "binomial") -> np.ndarray:
    """p-values of H: risk > eps for `k` events among `n` inputs (array of k)."""
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose one of {BOUNDS}")
    k = np.asarray(k, np.int64)
    if n == 0:
        return np.ones(k.shape)
    tail = binomial_cdf(k, n, eps)
    if bound == "binomial":
        return tail
    rate = k / n  # Hoeffding-Bentkus: min(Hoeffding's KL bound, e * the binomial tail at ceil(n rate) = k)
    hoeffding = np.exp(-n * _kl(np.minimum(rate, eps), eps))
    return np.minimum(1.0, np.minimum(hoeffding, math.e * tail))


def upper_bound(k: int, n: int, level: float, bound: str = "binomial") -> float:
    """The least eps at which `k` events in `n` inputs are rejected at `level` (p-value <= level):
    an upper confidence bound on the risk (binomial: Clopper-Pearson's one-sided one)."""
    if n == 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    if p_values([k], n, max(lo, 1e-300), bound)[0] <= level:
        return lo
    for _ in range(64):  # p-values fall as eps grows
        mid = (lo + hi) / 2
        if p_values([k], n, mid, bound)[0] <= level:
            hi = mid
        else:
            lo = mid
    return hi


def min_inputs(eps: float, level: float) -> int:
    """The fewest inputs on which a setting with no risk event is certified (binomial, Hoeffding-
    Bentkus alike for k = 0): (1 - eps)^n <= level. An `eps` or `level` so small that the count
    overflows a float (5e-324) needs more inputs than any split holds: `sys.maxsize`."""
    need = math.log(level) / math.log1p(-eps) if level > 0 else math.inf
    return math.ceil(need) if math.isfinite(need) else sys.maxsize


def fixed_sequence(pvals: Sequence[float], level: float) -> int:
    """Fixed-sequence testing: how many hypotheses, in the given order, are rejected at `level`
    before the first that is not."""
    for i, p in enumerate(pvals):
        if p > level:
            return i
    return len(pvals)


# ---- risks -------------------------------------------------------------------------------------------
def check_risk(risk: str, num_labels: int, labels=None, tolerance: float | None = None) -> None:
    """ValueError naming what is wrong with a risk, its labels and its tolerance."""
    if risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}; choose one of {RISKS}")
    if risk == "drop" and labels is None:
        raise ValueError("the drop risk needs labels (the full model right, the exit wrong); "
                         "without labels use the consistency risk")
    if num_labels == 1 and tolerance is None:
        raise ValueError(f"a regression task needs a tolerance for the {risk} risk "
                         "(outputs further apart than it differ; --risk-tolerance)")
    if num_labels > 1 and tolerance is not None:
        raise ValueError("a risk tolerance applies to regression only (classification compares labels)")
    if tolerance is not None and (isinstance(tolerance, bool) or not tolerance >= 0):
        raise ValueError(f"the risk tolerance must be a number >= 0, got {tolerance!r}")


def _same(a: np.ndarray, b: np.ndarray, tolerance: float | None) -> np.ndarray:
    return a == b if tolerance is None else np.abs(a.astype(np.float64) - b.astype(np.float64)) <= tolerance


def events(risk: str, predictions: np.ndarray, full: np.ndarray, labels=None,
           tolerance: float | None = None) -> np.ndarray:
    """The risk's events (bool, shape of `predictions` `[..., N]`) against the full model's
    predictions `full [N]` (and `labels [N]` for `drop`)."""
    if risk == "consistency":
        return ~_same(predictions, full, tolerance)
    labels = np.asarray(labels)
    return _same(full, labels, tolerance) & ~_same(predictions, labels, tolerance)


# ---- the sequences a policy is tested along ----------------------------------------------------------
def sequences(label: str, num_layers: int, num_labels: int, fixed: Mapping | None = None,
              grid: Sequence[Mapping] | None = None) -> list[list[dict]]:
    """The settings of policy `label` (its calibration grid with `fixed` held, or `grid`) as fixed
    sequences, each ordered from its safest setting outward along the last open parameter; one
    sequence per value of the other open parameters (Bonferroni over them)."""
    fixed = dict(fixed or {})
    grid = list(grid) if grid is not None else offline.calibration_grid(label, num_layers, num_labels, fixed)
    if not grid:
        raise ValueError(f"no {label} settings to calibrate")
    name = policies.parse_label(label)[0]
    faster = registry.get(name).faster(policies.make_policy(label, num_layers, num_labels, **grid[0]))
    open_params = [k for k in policies.param_names(name, num_labels) if k not in fixed]
    path, others = open_params[-1], open_params[:-1]
    if path not in faster:
        raise ValueError(f"the registry entry of {name} does not say which way {path} saves layers (faster)")
    groups: dict[tuple, list[dict]] = {}
    for setting in grid:
        groups.setdefault(tuple(setting[k] for k in others), []).append(dict(setting))
    return [sorted(g, key=lambda s: faster[path] * s[path]) for _, g in sorted(groups.items())]


# ---- certification -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Certificate:
    """A setting certified on `n` calibration inputs: with probability >= 1 - `delta` its risk on
    new inputs from the same distribution is at most `max_risk`. `bound` is the upper confidence
    bound on its risk at the level it was tested at (<= max_risk); `certified` is False when no
    setting was, and `policy` is then the full model, `static` k = L (bound 0: its risk is 0 by
    definition)."""

    policy: Policy
    certified: bool
    risk: str
    max_risk: float
    delta: float
    n: int
    bound: float
    method: str
    empirical_risk: float        # on the calibration inputs
    saving: float                # on the calibration inputs
    tested: int                  # hypotheses tested, over all sequences
    rejected: int                # certified settings
    sequences: int               # Bonferroni divisor
    tolerance: float | None = None
    reason: str = ""             # why nothing was certified

    @property
    def params(self) -> dict:
        return dict(self.policy.params)

    def as_dict(self) -> dict:
        return {"policy": self.policy.label, "params": self.params, "certified": self.certified,
                "risk": self.risk, "max_risk": self.max_risk, "risk_delta": self.delta, "n": self.n,
                "bound": self.bound, "method": self.method, "empirical_risk": self.empirical_risk,
                "saving": self.saving, "tested": self.tested, "rejected": self.rejected,
                "sequences": self.sequences, "tolerance": self.tolerance, **({"reason": self.reason} if self.reason else {})}

    def describe(self) -> str:
        """One line: what was certified, or that nothing was and why."""
        tail = f"on {self.n} inputs ({self.risk} risk <= {self.max_risk}, delta {self.delta}, {self.method})"
        if not self.certified:
            return f"no setting certified {tail}: {self.reason}; serving the full model"
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return (f"certified {self.policy.label} {params} {tail}: risk bound {self.bound:.4f}, "
                f"calibration risk {self.empirical_risk:.4f}, saving {self.saving:.3f}")


def choose(counts: np.ndarray, savings: np.ndarray, order: Sequence[Sequence[int]], n: int, max_risk: float,
           delta: float, method: str = "binomial") -> tuple[int | None, int]:
    """The certified setting with the largest saving (index into `counts` / `savings`, None if none)
    and the number certified. `order`: the fixed sequences, as indices, safest first; each is
    tested at `delta / len(order)`."""
    level = delta / len(order)
    best, rejected = None, 0
    for seq in order:
        seq = list(seq)
        passed = fixed_sequence(p_values(counts[seq], n, max_risk, method), level)
        rejected += passed
        for i in seq[:passed]:
            if best is None or savings[i] > savings[best] + 1e-12:
                best = i
    return best, rejected


def naive_choice(counts: np.ndarray, savings: np.ndarray, n: int, max_risk: float) -> int | None:
    """Today's rule, without a guarantee: the largest saving whose risk on the calibration inputs
    is at most `max_risk` (ties: the earlier setting)."""
    ok = np.flatnonzero(counts <= max_risk * n + 1e-9)
    return None if ok.size == 0 else int(ok[np.argmax(savings[ok])])


def risk_table(settings: Sequence[Policy], outputs, risk: str, labels=None, tolerance: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """For every setting: its risk events `[G, N]` (bool) and exit layers `[G, N]`."""
    logits = offline.parts(outputs)[0]
    num_labels = logits.shape[2]
    check_risk(risk, num_labels, labels, tolerance)
    exit_layer = offline.exit_layers(list(settings), outputs)
    full = offline.ramp_predictions(outputs)[-1]
    rows = np.arange(logits.shape[1])
    cache = {}
    out = np.empty(exit_layer.shape, bool)
    for g, (policy, layers) in enumerate(zip(settings, exit_layer)):
        key = "ensemble" if policy.ensemble else "ramps"
        if key not in cache:
            cache[key] = offline.ensemble_predictions(outputs) if policy.ensemble else offline.ramp_predictions(outputs)
        out[g] = events(risk, cache[key][layers - 1, rows], full, labels, tolerance)
    return out, exit_layer


def full_model(num_layers: int, num_labels: int) -> Policy:
    """The fallback when nothing is certified: every input to layer L, predicted by ramp L (a
    policy's own safest setting is not always that: with a parameter held, or pabee's smallest
    delta for regression, it may still exit)."""
    return policies.make_policy("static", num_layers, num_labels, k=num_layers)


def certify(label: str, outputs, *, risk: str = "consistency", max_risk: float, delta: float = 0.1,
            labels=None, tolerance: float | None = None, method: str = "binomial", fixed: Mapping | None = None,
            grid: Sequence[Mapping] | None = None) -> Certificate:
    """Learn then Test over policy `label`'s settings on the calibration outputs `[L, N, C]` (or
    `RampOutputs`); `fixed` parameters are held, the others searched. Raises ValueError for bad
    values; an uncertifiable target is not an error (the full model, `certified=False`)."""
    max_risk, delta = _check_level("max_risk", max_risk), _check_level("risk_delta", delta)
    if method not in BOUNDS:
        raise ValueError(f"unknown bound {method!r}; choose one of {BOUNDS}")
    logits = offline.parts(outputs)[0]
    if logits.ndim != 3:
        raise ValueError(f"ramp outputs must be [L, N, C], got shape {logits.shape}")
    L, n, C = logits.shape
    if labels is not None and np.shape(labels) != (n,):
        raise ValueError(f"labels must be [N] = [{n}], got shape {np.shape(labels)}")
    check_risk(risk, C, labels, tolerance)
    fixed = dict(fixed or {})
    order = sequences(label, L, C, fixed, grid)
    flat = [s for seq in order for s in seq]
    settings = [policies.make_policy(label, L, C, **s) for s in flat]
    table, exit_layer = risk_table(settings, outputs, risk, labels, tolerance)
    counts, savings = table.sum(axis=1), 1.0 - exit_layer.mean(axis=1) / L
    index, start = [], 0
    for seq in order:
        index.append(range(start, start + len(seq)))
        start += len(seq)
    best, rejected = choose(counts, savings, index, n, max_risk, delta, method)
    common = dict(risk=risk, max_risk=max_risk, delta=delta, n=n, method=method, tested=len(flat),
                  rejected=rejected, sequences=len(order), tolerance=tolerance)
    if best is None:
        need = min_inputs(max_risk, delta / len(order))
        why = (f"{n} inputs are too few (a risk of {max_risk} needs at least {need})" if n < need else
               f"even the safest step of each sequence has risk above what {n} inputs certify at {max_risk}")
        return Certificate(full_model(L, C), False, bound=0.0, empirical_risk=0.0, saving=0.0,
                           reason=why, **common)
    bound = upper_bound(int(counts[best]), n, delta / len(order), method)
    return Certificate(settings[best], True, bound=min(bound, max_risk), empirical_risk=float(counts[best] / n),
                       saving=float(savings[best]), **common)
