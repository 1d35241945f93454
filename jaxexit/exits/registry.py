"""One entry per exit policy: everything the library and the CLI know about it.

An entry (`PolicySpec`) holds the policy's parameters (type, range, CLI flags and help), its step
(the state machine, run live on the host, on the device and by `policies.simulate`), its
closed-form offline rule (`measure` once per ramp, then `fires` for a block of settings), its
default sweep and calibration grids, its earliest exit, its initial state, and whether it
thresholds a softmax confidence (refused for regression) or reads the learning-to-exit module.
`policies`, `offline` and `jaxexit.cli.policy_flags` read these entries; none branches on a
policy's name. Adding a policy is adding an entry here (docs/adding-a-policy.md).

Signatures: `step(policy, state, logits [B, C], lte [B] or None, layer, xp) -> (state, exits [B])`
(layer 1-based; `policies.step` masks layer L and adds the ensemble); `measure(policy, logits
[L, N, C], lte [L, N] or None) -> [L, N]` (or None); `fires(block, measure, L, N) -> bool [L, G, N]`
for G settings of one policy (and one confidence); `grid(L, C, confidence) -> [params]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from jaxexit.exits import measures
from jaxexit.exits.measures import holds


@dataclasses.dataclass(frozen=True)
class Param:
    """A policy parameter: `kind` int or float in `[low, high]` (`high`: None unbounded, "L" the
    number of layers). `flags` and `help` make its CLI flag (default `--<name>`); a name used by
    several policies is one flag, its help joined over them."""

    name: str
    kind: type
    low: float
    high: float | str | None = None
    help: str = ""
    flags: tuple[str, ...] = ()
    regression_only: bool = False  # taken only when num_labels == 1 (pabee's delta)

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or (f"--{self.name}",)


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A registry entry; see the module docstring for the callables' signatures."""

    name: str
    params: tuple[Param, ...]
    step: Callable
    measure: Callable
    fires: Callable
    grid: Callable
    calibration_grid: Callable | None = None  # None: the sweep grid
    earliest: Callable[[Any], int] = lambda policy: 1
    init: Callable = lambda policy, batch_size, xp: {}
    softmax: bool = False        # thresholds a softmax confidence: constant for regression, refused
    needs_lte: bool = False      # reads the learning-to-exit module's output
    confidence: bool = False     # takes the `[confidence]` option (pcee)
    implied_by: tuple[str, ...] = ()   # CLI: parameter flags that, without --policy, name this policy
    implied_with: tuple[str, ...] = ()  # ... and the others it may come with
    implied_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # which way each parameter saves layers: +1 where a larger value exits earlier, -1 where a smaller
    # one does (of a policy, since pcee's tau turns with its confidence); risk calibration walks the
    # last open parameter from its safest value outward (exits/risk.py)
    faster: Callable[[Any], Mapping[str, int]] = lambda policy: {}

    def param(self, key: str) -> Param | None:
        return next((p for p in self.params if p.name == key), None)


REGISTRY: dict[str, PolicySpec] = {}


def register(spec: PolicySpec) -> PolicySpec:
    """Add an entry; a parameter name keeps one type across policies (it is one CLI flag)."""
    for p in spec.params:
        for other in REGISTRY.values():
            q = other.param(p.name)
            if q is not None and q.kind is not p.kind:
                raise TypeError(f"{spec.name}.{p.name} is {p.kind.__name__}, {other.name}.{p.name} {q.kind.__name__}")
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> PolicySpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown exit policy {name!r}; choose one of {tuple(REGISTRY)}")
    return REGISTRY[name]


# ---- shared pieces of entries ----------------------------------------------------------------------
Q = np.linspace(0.0, 1.0, 201) ** 2  # threshold grids: quadratic, dense where fine-tuned ramps sit


def col(block, key: str) -> np.ndarray:
    """Parameter `key` of each setting in `block`, `[1, G, 1]` (float64 for thresholds)."""
    return np.asarray([p[key] for p in block])[None, :, None]


def run_length(ok: np.ndarray) -> np.ndarray:
    """Consecutive True values ending at each layer along axis 0 of `[L, G, N]`: the counter k_i."""
    run = np.zeros(ok.shape, np.int32)
    run[0] = ok[0]
    for i in range(1, len(ok)):
        run[i] = ok[i] * (run[i - 1] + 1)
    return run


def threshold_rule(measure: Callable, key: str, above: bool, reads_lte: bool = False) -> dict:
    """`step`, `measure` and `fires` of "exit when measure > policy[key]" (above) or "<", the
    measure reading the logits or (reads_lte) the LTE's output."""
    def step(policy, state, z, lte, layer, xp):
        return state, holds(measure, lte if reads_lte else z, above, policy, key, xp)

    def layer_measure(policy, logits, lte):
        return measure(lte if reads_lte else logits)

    def fires(block, m, L, N):
        return m[:, None] > col(block, key) if above else m[:, None] < col(block, key)

    return dict(step=step, measure=layer_measure, fires=fires, faster=lambda policy: {key: -1 if above else 1})


def _count(policy, batch_size, xp):
    return {"count": xp.zeros(batch_size, xp.int32)}


_PATIENCE = "{} layers in a row to exit"


# ---- entropy(S): exit when H(p) < S (nats); DeeBERT, BranchyNet -----------------------------------------
register(PolicySpec(
    "entropy",
    (Param("S", float, 0.0, math.inf, "threshold in nats (DeeBERT)", ("--S", "--entropy")),),
    **threshold_rule(measures.entropy, "S", above=False),
    grid=lambda L, C, confidence: [{"S": float(x * math.log(C))} for x in Q],
    softmax=True, implied_by=("S",)))


# ---- pcee(patience, tau): k = k + 1 if confident else 0; exit at k = patience; PCEE-BERT ------------------
CONFIDENCES = ("entropy", "maxprob", "learned")  # pcee's confidence test: PCEE-BERT, -v1, -v2


def pcee_confidence(policy):
    """pcee's per-layer test, `(measure, above)`: a layer is confident when `measure > tau` (above)
    or `measure < tau`; the measure reads the logits, or the LTE's output for `learned`
    (`policy.needs_lte`). PCEE-BERT, -v1, -v2."""
    return {"entropy": (measures.normalized_entropy, False), "maxprob": (measures.max_prob, True),
            "learned": (measures.predicted_error, False)}[policy.confidence]


def _pcee_step(policy, state, z, lte, layer, xp):
    measure, above = pcee_confidence(policy)
    confident = holds(measure, lte if policy.needs_lte else z, above, policy, "tau", xp)
    count = xp.where(confident, state["count"] + 1, 0)
    return {"count": count}, count >= policy["patience"]  # first True is at count == patience


def _pcee_fires(block, m, L, N):
    above = pcee_confidence(block[0])[1]
    confident = m[:, None] > col(block, "tau") if above else m[:, None] < col(block, "tau")
    return run_length(confident) >= col(block, "patience")


def _pcee_grid(L, C, confidence):
    if confidence == "maxprob":  # confident when max p > tau: tau from 1 down to 1 / C
        taus = 1.0 - np.linspace(0.0, 1.0, 41) ** 2 * (1.0 - 1.0 / C)
        taus[-1] = 1.0 / C
    else:
        taus = np.linspace(0.0, 1.0, 41) ** 2
    return [{"patience": p, "tau": float(tau)} for p in range(1, max(L, 2)) for tau in taus]


register(PolicySpec(
    "pcee",
    (Param("patience", int, 1, help=_PATIENCE.format("confident")),
     Param("tau", float, 0.0, 1.0, "normalised-entropy threshold in [0, 1]")),
    step=_pcee_step, fires=_pcee_fires, grid=_pcee_grid,
    measure=lambda policy, logits, lte: pcee_confidence(policy)[0](lte if policy.needs_lte else logits),
    earliest=lambda policy: policy["patience"], init=_count, softmax=True, confidence=True,
    faster=lambda policy: {"patience": -1, "tau": -1 if pcee_confidence(policy)[1] else 1},
    implied_by=("tau",), implied_with=("patience",), implied_defaults={"patience": 1}))


# ---- maxprob(t): exit when max p > t; Shallow-Deep ----------------------------------------------------
register(PolicySpec(
    "maxprob",
    (Param("t", float, 0.0, 1.0, "probability threshold in [0, 1]", ("--t", "--max-prob")),),
    **threshold_rule(measures.max_prob, "t", above=True),
    # from 1 / C (exactly: the range's end) up to 1
    grid=lambda L, C, confidence: [{"t": 1.0 / C if x == 1.0 else float(1.0 - x * (1.0 - 1.0 / C))}
                                   for x in Q[::-1]],
    softmax=True, implied_by=("t",)))


# ---- pabee(patience[, delta]): k = k + 1 if argmax z == previous argmax else 0 (regression:
# |z - previous z| < delta); exit at k = patience; PABEE ---------------------------------------------
def _pabee_step(policy, state, z, lte, layer, xp):
    pred = measures.prediction(z, xp)
    if policy.num_labels == 1:
        # float64 difference of two float32 outputs: exact, the same in every mode
        gap = lambda prev, xp: xp.abs(measures.float64(pred, xp) - measures.float64(prev, xp))  # noqa: E731
        agree = holds(gap, state["prev"], False, policy, "delta", xp)
    else:
        agree = pred == state["prev"]
    count = xp.where(agree & (layer > 1), state["count"] + 1, 0)  # layer 1 has nothing to agree with
    return {"count": count, "prev": pred}, count >= policy["patience"]


def _pabee_fires(block, pred, L, N):
    G = len(block)
    if block[0].num_labels == 1:
        agree = np.abs(pred[1:] - pred[:-1])[:, None] < col(block, "delta")
    else:
        agree = np.broadcast_to((pred[1:] == pred[:-1])[:, None], (L - 1, G, N))
    agree = np.concatenate([np.zeros((1, G, N), bool), agree])  # layer 1: nothing to agree with
    return run_length(agree) >= col(block, "patience")


def _pabee_init(policy, batch_size, xp):
    zeros = xp.zeros(batch_size, xp.int32)
    prev = zeros if policy.num_labels > 1 else measures.prediction(xp.zeros((batch_size, 1), xp.float32), xp)
    return {"count": zeros, "prev": prev}


def _pabee_grid(L, C, confidence):
    if C == 1:  # regression: agreement within delta (label units, e.g. STS-B's 0..5)
        return [{"patience": p, "delta": d} for p in range(1, L + 1) for d in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)]
    return [{"patience": p} for p in range(1, L + 1)]


register(PolicySpec(
    "pabee",
    (Param("patience", int, 1, help=_PATIENCE.format("agreeing")),
     Param("delta", float, 0.0, math.inf, "agreement tolerance (regression only)", regression_only=True)),
    step=_pabee_step, fires=_pabee_fires, grid=_pabee_grid,
    measure=lambda policy, logits, lte: measures.prediction(logits),
    earliest=lambda policy: policy["patience"] + 1, init=_pabee_init, implied_by=("patience", "delta"),
    faster=lambda policy: {"patience": -1, "delta": 1}))


# ---- static(k): everyone exits at layer k; budgeted exit --------------------------------------------
register(PolicySpec(
    "static",
    (Param("k", int, 1, "L", "exit layer"),),
    step=lambda policy, state, z, lte, layer, xp: (state, xp.zeros(z.shape[0], bool) | (layer >= policy["k"])),
    measure=lambda policy, logits, lte: None,
    fires=lambda block, m, L, N: np.broadcast_to(np.arange(1, L + 1)[:, None, None] >= col(block, "k"),
                                                 (L, len(block), N)),
    grid=lambda L, C, confidence: [{"k": k} for k in range(1, L + 1)],
    earliest=lambda policy: policy["k"], implied_by=("k",), faster=lambda policy: {"k": -1}))


# ---- berxit(t): exit when the LTE's predicted error u < t; BERxiT ------------------------------------------
register(PolicySpec(
    "berxit",
    (Param("t", float, 0.0, 1.0, "predicted-error threshold in [0, 1]"),),
    **threshold_rule(measures.predicted_error, "t", above=False, reads_lte=True),
    grid=lambda L, C, confidence: [{"t": float(x)} for x in Q],  # dense near 0, from t = 0 (never) up to 1
    needs_lte=True))


# ---- margin(margin): exit when p_(1) - p_(2) > margin, the gap between the top two probabilities ---------
def top2_margin(logits, xp=np):
    """p_(1) - p_(2) of softmax(z) over the last axis, float64, in [0, 1]: exactly 0 where the two
    largest logits are equal (every uniform row), strictly above 0 elsewhere, as in exact
    arithmetic, so margin = 0 decides alike in every mode (measures.py, "per-ramp measures")."""
    with measures.x64(xp):
        logp = xp.sort(measures.log_softmax(logits, xp), axis=-1)
        m = xp.exp(logp[..., -1]) - xp.exp(logp[..., -2])
        z = xp.sort(measures.float64(logits, xp), axis=-1)
        return measures.pin(m, z[..., -1] == z[..., -2], xp, 0.0, math.nextafter(0.0, 1.0))


register(PolicySpec(
    "margin",
    (Param("margin", float, 0.0, 1.0, "top-2 probability gap threshold in [0, 1]"),),
    **threshold_rule(top2_margin, "margin", above=True),
    grid=lambda L, C, confidence: [{"margin": float(1.0 - x)} for x in Q[::-1]],  # 0 (exits all) .. 1 (never)
    softmax=True, implied_by=("margin",)))
