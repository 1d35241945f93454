"""Exit policies: one small state machine per policy, stepped once per layer on that layer's ramp.

`step(policy, state, logits, layer, xp)` is the only definition of each policy. It runs

* live on the host (`xp=numpy`) on whichever rows are still in the batch; `take_rows` keeps the
  state in step with the rows the runner keeps;
* on the device (`xp=jax.numpy`) inside `jit` / `lax.scan` / `lax.while_loop` (`scan_exits`); a
  `Policy` is a pytree whose thresholds are leaves, so changing them does not recompile;
* offline over cached logits `[L, N, C]` (`simulate`); `jaxexit.exits.offline` evaluates parameter
  grids in closed form and is tested equal to stepping this.

Layers are 1-based (`layer = 1..L`). `step` returns the rows whose exit condition holds at this
layer; no exit fires at layer `L` (an input that never exits uses ramp `L`). The caller keeps the
first layer at which a row exits (`first_exit`).

Every measure a policy thresholds is computed in float64 in every mode (on the device inside
`jax.enable_x64`), thresholds included, and the ends of each range are exact; see "per-ramp
measures" below.

Policies (docs/policies.md), with `p = softmax(z)`, `C` classes:
  entropy(S)            exit when H(p) < S (nats)                              DeeBERT, BranchyNet
  pcee(patience, tau)   k = k + 1 if H(p) / ln C < tau else 0; exit at k = patience   PCEE-BERT
  maxprob(t)            exit when max p > t                                    Shallow-Deep
  pabee(patience[, delta])  k = k + 1 if argmax z == previous argmax else 0 (regression:
                        |z - previous z| < delta); exit at k = patience        PABEE
  static(k)             everyone exits at layer k                              budgeted exit
  berxit(t)             exit when the LTE's predicted error u < t              BERxiT (needs an LTE)

Two options (PCEE-BERT section 4.6), written into a policy's label, which is what names a policy
everywhere (result rows, grids, calibration, `make_policy`):
  pcee[maxprob]         PCEE-BERT-v1: a layer is confident when max p > tau (instead of H / ln C < tau)
  pcee[learned]         PCEE-BERT-v2: a layer is confident when the LTE's u < tau
  <policy>+ensemble     the cross-layer ensemble: an input exiting at layer m is predicted from the
                        mean of ramps 1..m's probabilities (regression: outputs); exits unchanged.
The running sum lives in the policy state (`ens`), in float32 from the float64 probabilities, the
same additions in the same order in every mode; `output` gives a row's prediction source.

A ramp's output is its logits `[B, C]`, or on a model with a learning-to-exit module
`RampOutputs(logits, lte)` (`lte [B]`: the LTE's pre-sigmoid output); `step`, `simulate` and
`scan_exits` take either, and the learned policies need the second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxexit.exits.types import RampOutputs

POLICIES = ("entropy", "pcee", "maxprob", "pabee", "static", "berxit")
# Policies that threshold a softmax confidence: degenerate for one output (regression).
SOFTMAX_POLICIES = ("entropy", "pcee", "maxprob")
CONFIDENCES = ("entropy", "maxprob", "learned")  # pcee's confidence test: PCEE-BERT, -v1, -v2
_LABEL = re.compile(r"^(?P<name>[a-z]+)(?:\[(?P<confidence>[a-z]+)\])?(?P<ensemble>\+ensemble)?$")

State = dict  # name -> per-row array [B]; empty for stateless policies


def param_names(name: str, num_labels: int) -> tuple[str, ...]:
    """The parameters policy `name` takes (pabee's `delta` only for regression)."""
    if name == "pabee":
        return ("patience", "delta") if num_labels == 1 else ("patience",)
    return {"entropy": ("S",), "pcee": ("patience", "tau"), "maxprob": ("t",), "static": ("k",), "berxit": ("t",)}[name]


# ---- the policy value ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Policy:
    """A validated policy setting for a model with `num_layers` ramps of `num_labels` outputs.

    `params` is a sorted tuple of `(name, value)` pairs (a mapping is accepted), so a `Policy` is
    hashable; `policy["tau"]` reads one. As a pytree its values are leaves: pass it to a jitted
    function as an argument and new thresholds reuse the compiled code.
    """

    name: str
    num_layers: int
    num_labels: int
    params: tuple[tuple[str, Any], ...]
    confidence: str = "entropy"  # pcee only: "maxprob" is PCEE-BERT-v1, "learned" -v2
    ensemble: bool = False       # predict from the mean of ramps 1..m (exits unchanged)

    def __post_init__(self):
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, got {self.confidence!r}")
        if self.confidence != "entropy" and self.name != "pcee":
            raise ValueError(f"confidence applies to pcee only, not to {self.name!r}")
        if not isinstance(self.ensemble, bool):
            raise ValueError(f"ensemble must be True or False, got {self.ensemble!r}")
        checked = _validate(self.name, self.num_layers, self.num_labels, dict(self.params), self.confidence)
        object.__setattr__(self, "params", tuple(sorted(checked.items())))

    @property
    def needs_lte(self) -> bool:
        """Whether the policy reads the learning-to-exit module's output (berxit, pcee[learned])."""
        return self.name == "berxit" or self.confidence == "learned"

    @property
    def label(self) -> str:
        """The policy's full name: `pcee`, `pcee[maxprob]`, `entropy+ensemble`, ..."""
        return compose_label(self.name, self.confidence, self.ensemble)

    def __getitem__(self, key: str):
        for k, v in self.params:
            if k == key:
                return v
        raise KeyError(f"policy {self.name!r} has no parameter {key!r}")

    def as_dict(self) -> dict:
        """`{"policy": label, **params}`, for result files."""
        return {"policy": self.label, **dict(self.params)}

    def __str__(self) -> str:
        return f"{self.label}({', '.join(f'{k}={v}' for k, v in self.params)})"


def compose_label(name: str, confidence: str = "entropy", ensemble: bool = False) -> str:
    """The label `parse_label` reads: `name`, `[confidence]` unless the default, `+ensemble`."""
    return name + (f"[{confidence}]" if confidence != "entropy" else "") + ("+ensemble" if ensemble else "")


def parse_label(label: str) -> tuple[str, str, bool]:
    """`"pcee[maxprob]+ensemble"` -> `("pcee", "maxprob", True)`; a plain name -> `(name, "entropy", False)`."""
    m = _LABEL.match(label) if isinstance(label, str) else None
    if m is None:
        raise ValueError(f"unknown exit policy {label!r}; choose one of {POLICIES} (pcee[maxprob] for "
                         "PCEE-BERT-v1; +ensemble after any for the cross-layer ensemble)")
    return m["name"], m["confidence"] or "entropy", bool(m["ensemble"])


def make_policy(label: str, num_layers: int, num_labels: int, **params) -> Policy:
    """`make_policy("pcee", 12, 2, patience=2, tau=0.2)`, or with a full label
    (`"pcee[maxprob]+ensemble"`); raises ValueError on bad settings."""
    name, confidence, ensemble = parse_label(label)
    return Policy(name, num_layers, num_labels, tuple(params.items()), confidence, ensemble)


FLOAT_PARAMS = ("S", "tau", "t", "delta")  # thresholds; the others are integers (patience, k)


def _flatten(p: Policy):
    # Thresholds travel as the two 32-bit halves of their float64 bit pattern: outside x64, jit
    # would turn a float leaf into float32, and `threshold` could not compare at float64.
    keys = tuple(k for k, _ in p.params)
    leaves = [_to_bits(v) if k in FLOAT_PARAMS else v for k, v in p.params]
    return leaves, (p.name, p.num_layers, p.num_labels, keys, p.confidence, p.ensemble)


def _unflatten(aux, leaves) -> Policy:
    # Bypasses validation: under jit the leaves are tracers (or jax's placeholders); concrete bit
    # patterns (a tree_map over a Policy) turn back into floats.
    name, num_layers, num_labels, keys, confidence, ensemble = aux
    values = [_from_bits_host(v) if k in FLOAT_PARAMS else v for k, v in zip(keys, leaves)]
    p = object.__new__(Policy)
    for field, value in (("name", name), ("num_layers", num_layers), ("num_labels", num_labels),
                         ("params", tuple(zip(keys, values))), ("confidence", confidence), ("ensemble", ensemble)):
        object.__setattr__(p, field, value)
    return p


def _to_bits(value) -> np.ndarray:
    if isinstance(value, (np.ndarray, jax.Array)) or not isinstance(value, numbers.Real):
        return value  # already bits (or a placeholder object of jax's)
    bits = int(np.float64(value).view(np.uint64))
    return np.array([bits >> 32, bits & 0xFFFFFFFF], np.uint32)


def _from_bits_host(leaf):
    if isinstance(leaf, jax.core.Tracer) or not hasattr(leaf, "shape") or np.shape(leaf) != (2,):
        return leaf
    hi, lo = (int(x) for x in np.asarray(leaf, np.uint64))
    return float(np.uint64((hi << 32) | lo).view(np.float64))


def threshold(policy: Policy, key: str, xp=np):
    """Float parameter `key` at float64: a Python float on the host; on the device (inside
    `jax.enable_x64`, as `step` runs) a float64 scalar, decoded from its bit pattern when the
    policy was passed through `jit` as an argument."""
    value = policy[key]
    if xp is np or isinstance(value, numbers.Real):
        return value if xp is np else jnp.float64(value)
    bits = jnp.asarray(value).astype(jnp.uint64)
    return lax.bitcast_convert_type((bits[0] << 32) | bits[1], jnp.float64)


jax.tree_util.register_pytree_node(Policy, _flatten, _unflatten)


def _validate(name: str, num_layers: int, num_labels: int, params: Mapping[str, Any],
              confidence: str = "entropy") -> dict:
    if name not in POLICIES:
        raise ValueError(f"unknown exit policy {name!r}; choose one of {POLICIES}")
    L = _integer("num_layers", num_layers, low=1)
    C = _integer("num_labels", num_labels, low=1)
    if C == 1 and name in SOFTMAX_POLICIES and confidence != "learned":
        raise ValueError(
            f"policy {name!r} thresholds softmax confidence, which is constant for a regression "
            f"task (num_labels=1); use 'pabee' (with delta) or 'static'"
        )
    expected = param_names(name, C)
    if set(params) != set(expected):
        extra = sorted(set(params) - set(expected))
        missing = sorted(set(expected) - set(params))
        hint = " (delta applies to regression only)" if "delta" in extra else ""
        raise ValueError(f"policy {name!r} takes parameters {expected}; missing {missing}, unexpected {extra}{hint}")
    out = {}
    for key, value in params.items():
        if key in ("patience", "k"):
            out[key] = _integer(key, value, low=1, high=L if key == "k" else None)
        else:
            high = 1.0 if key in ("tau", "t") else math.inf  # berxit's t bounds a predicted error in [0, 1]
            out[key] = _real(key, value, low=0.0, high=high)
    return out


def _integer(key: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{key} must be in {low}..{'' if high is None else high}, got {value}")
    return value


def _real(key: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key} must be a number, got {value!r}")
    value = float(value)
    if not low <= value <= high:  # also rejects NaN
        raise ValueError(f"{key} must be in [{low}, {high}], got {value}")
    return value


# ---- per-ramp measures (shared by step and the offline closed form) ------------------------------
# docs/policies.md: every measure a policy thresholds is computed at one precision in every mode, so that
# a threshold at the edge of its range gives the same exits on host, device and offline. That
# precision is float64: in float32 a near-uniform ramp output (logits ~1e-3 apart) has a
# normalised entropy within an ulp of 1.0, and XLA's and numpy's float32 exp/log, or XLA's at two
# batch shapes, round it to either side of tau = 1. On the device the measures run inside
# `jax.enable_x64` (a few [B, C] operations per layer); float64 logits differences of ~1e-3 put
# them ~1e9 ulps from the ends of the range.
# The ends themselves are exact: a uniform row (all logits equal) has H = ln C, H / ln C = 1 and
# max p = 1 / C exactly, and every other row lies strictly inside (H < ln C, H / ln C < 1,
# max p > 1 / C), as it does in exact arithmetic, so rounding cannot decide S = ln C, tau = 1 or
# t = 1 / C differently in two modes. (H >= 0 and max p <= 1 hold by construction.)
def _x64(xp):
    return jax.enable_x64(True) if xp is not np else contextlib.nullcontext()


def _float64(logits, xp):
    return xp.asarray(logits).astype(xp.float64)


def _uniform(logits, xp):
    z = xp.asarray(logits)
    return xp.max(z, axis=-1) == xp.min(z, axis=-1)


def _pin(value, logits, xp, at: float, inside: float):
    """`at` for uniform rows; every other row's value clipped to `inside` (one ulp within `at`)."""
    clip = xp.minimum if inside < at else xp.maximum
    return xp.where(_uniform(logits, xp), at, clip(value, inside))


def log_softmax(logits, xp=np):
    """Stable log-softmax over the last axis in float64: finite for huge logits, -inf only where p = 0.

    A row needs one finite logit; +inf or all -inf give NaN, which passes no threshold.
    """
    with _x64(xp):
        z = _float64(logits, xp)
        s = z - xp.max(z, axis=-1, keepdims=True)
        return s - xp.log(xp.sum(xp.exp(s), axis=-1, keepdims=True))


def entropy(logits, xp=np):
    """H(softmax(z)) in nats over the last axis, float64; 0 * log 0 counts as 0 (no NaN)."""
    with _x64(xp):
        logp = log_softmax(logits, xp)
        p = xp.exp(logp)
        h = -xp.sum(p * xp.where(p > 0, logp, 0.0), axis=-1)
        top = math.log(logits.shape[-1])
        return _pin(h, logits, xp, top, math.nextafter(top, 0.0))


def normalized_entropy(logits, xp=np):
    """H / ln C, in [0, 1] (PCEE's confidence measure), float64."""
    with _x64(xp):
        c = entropy(logits, xp) / math.log(logits.shape[-1])
        return _pin(c, logits, xp, 1.0, math.nextafter(1.0, 0.0))


def max_prob(logits, xp=np):
    """max softmax(z) over the last axis, float64, in [1 / C, 1]."""
    with _x64(xp):
        m = xp.exp(xp.max(log_softmax(logits, xp), axis=-1))
        low = 1.0 / logits.shape[-1]
        return _pin(m, logits, xp, low, math.nextafter(low, 1.0))


def predicted_error(lte, xp=np):
    """The LTE's predicted error u = sigmoid(lte output) in float64, strictly inside (0, 1), so that
    t (or tau) = 0 never fires and 1 always does, in every mode."""
    with _x64(xp):
        a = xp.asarray(lte).astype(xp.float64)
        e = xp.exp(-xp.abs(a))  # no overflow for large |a|
        u = xp.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return xp.clip(u, math.nextafter(0.0, 1.0), math.nextafter(1.0, 0.0))


def split_outputs(outputs):
    """`(logits, lte or None)` of a ramp output (logits alone, or `RampOutputs`)."""
    if isinstance(outputs, RampOutputs):
        return outputs.logits, outputs.lte
    return outputs, None


def prediction(logits, xp=np):
    """A ramp's prediction: argmax (int32) for classification, the scalar for regression (C = 1;
    float64 on the host, the logits' own dtype on the device)."""
    if logits.shape[-1] == 1:
        return _float64(logits, xp)[..., 0] if xp is np else logits[..., 0]
    return xp.argmax(logits, axis=-1).astype(xp.int32)


# ---- the state machines --------------------------------------------------------------------------
def init_state(policy: Policy, batch_size: int, xp=np) -> State:
    """The state before layer 1 for `batch_size` rows."""
    zeros = xp.zeros(batch_size, xp.int32)
    state = {"ens": xp.zeros((batch_size, policy.num_labels), xp.float32)} if policy.ensemble else {}
    if policy.name == "pcee":
        return {**state, "count": zeros}
    if policy.name == "pabee":
        prev = zeros if policy.num_labels > 1 else prediction(xp.zeros((batch_size, 1), xp.float32), xp)
        return {**state, "count": zeros, "prev": prev}
    return state


def take_rows(state: State, rows) -> State:
    """The state of the rows `rows` (indices or a boolean mask), for a runner that drops rows."""
    return {k: v[rows] for k, v in state.items()}


def _holds(measure, z, above: bool, policy, key, xp):
    """`measure(z) > threshold` (above) or `< threshold`, both at float64 in every mode. On the
    device only this runs under `jax.enable_x64`: operations whose lowering reads the x64 flag
    (argmax's index type) stay outside, since the enclosing jit lowers after the context ends."""
    with _x64(xp):
        value, limit = measure(z, xp), threshold(policy, key, xp)
        return value > limit if above else value < limit


def _entropy(policy, state, z, lte, layer, xp):
    return state, _holds(entropy, z, False, policy, "S", xp)


def _maxprob(policy, state, z, lte, layer, xp):
    return state, _holds(max_prob, z, True, policy, "t", xp)


def pcee_confidence(policy: Policy):
    """pcee's per-layer test, `(measure, above)`: a layer is confident when `measure > tau` (above)
    or `measure < tau`; the measure reads the logits, or the LTE's output for `learned`
    (`policy.needs_lte`). PCEE-BERT, -v1, -v2."""
    return {"entropy": (normalized_entropy, False), "maxprob": (max_prob, True),
            "learned": (predicted_error, False)}[policy.confidence]


def _pcee(policy, state, z, lte, layer, xp):
    measure, above = pcee_confidence(policy)
    confident = _holds(measure, lte if policy.needs_lte else z, above, policy, "tau", xp)
    count = xp.where(confident, state["count"] + 1, 0)
    return {"count": count}, count >= policy["patience"]  # first True is at count == patience


def _pabee(policy, state, z, lte, layer, xp):
    pred = prediction(z, xp)
    if policy.num_labels == 1:
        # float64 difference of two float32 outputs: exact, the same in every mode
        gap = lambda prev, xp: xp.abs(_float64(pred, xp) - _float64(prev, xp))  # noqa: E731
        agree = _holds(gap, state["prev"], False, policy, "delta", xp)
    else:
        agree = pred == state["prev"]
    count = xp.where(agree & (layer > 1), state["count"] + 1, 0)  # layer 1 has nothing to agree with
    return {"count": count, "prev": pred}, count >= policy["patience"]


def _static(policy, state, z, lte, layer, xp):
    return state, xp.zeros(z.shape[0], bool) | (layer >= policy["k"])


def _berxit(policy, state, z, lte, layer, xp):
    return state, _holds(predicted_error, lte, False, policy, "t", xp)


_STEPS = {"entropy": _entropy, "pcee": _pcee, "maxprob": _maxprob, "pabee": _pabee, "static": _static,
          "berxit": _berxit}


def step(policy: Policy, state: State, outputs, layer, xp=np) -> tuple[State, Any]:
    """Advance the policy by one layer: `outputs` is ramp `layer`'s output (1-based): logits
    `[B, C]`, or `RampOutputs(logits, lte)` on a model with a learning-to-exit module.

    Returns `(new state, exits [B] bool)`. `exits` is False everywhere at layer `L`. Pass
    `xp=jax.numpy` to trace it (`layer` may then be a traced integer).
    """
    logits, lte = split_outputs(outputs)
    logits = xp.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != policy.num_labels:
        raise ValueError(f"step takes one layer's logits [B, {policy.num_labels}], got shape {logits.shape}")
    if isinstance(layer, numbers.Integral) and not 1 <= layer <= policy.num_layers:
        raise ValueError(f"layer must be in 1..{policy.num_layers}, got {layer}")
    if policy.needs_lte and lte is None:
        raise ValueError(NEEDS_LTE.format(policy=policy.label))
    new, exits = _STEPS[policy.name](policy, state, logits, lte, layer, xp)
    if policy.ensemble:
        new = {**new, "ens": state["ens"] + ensemble_term(logits, xp)}
    return new, exits & (layer < policy.num_layers)


def ensemble_term(logits, xp=np):
    """What one ramp adds to the ensemble sum: its probabilities (float64, rounded once to
    float32, so that every mode adds the same numbers), or its output for regression."""
    if logits.shape[-1] == 1:
        return xp.asarray(logits).astype(xp.float32)
    with _x64(xp):
        return xp.exp(log_softmax(logits, xp)).astype(xp.float32)


NEEDS_LTE = ("policy {policy} reads a learning-to-exit module, which this model does not have; train one "
             "with train/finetune.py --lte (or --lte-from <finished run>)")


def output(policy: Policy, state: State, outputs, layer, xp=np):
    """What a row exiting at `layer` (after `step` at that layer) is predicted from, `[B, C]`:
    ramp `layer`'s logits, or with the ensemble the mean of ramps 1..layer's probabilities
    (regression: outputs). `prediction` of it is the row's prediction."""
    if not policy.ensemble:
        return split_outputs(outputs)[0]
    return state["ens"] / xp.asarray(layer, xp.float32)


def earliest_exit(policy: Policy) -> int:
    """The first layer at which `policy` can exit a row (the last layer at most): pcee needs
    `patience` confident layers in a row, pabee `patience` agreements, the first at layer 2; static
    exits at `k`; the others can exit at layer 1. The pipelined latency runner runs the layers
    before it in one call, since no decision can be taken there."""
    if policy.name == "pcee":
        first = policy["patience"]
    elif policy.name == "pabee":
        first = policy["patience"] + 1
    elif policy.name == "static":
        first = policy["k"]
    else:
        first = 1
    return min(int(first), policy.num_layers)


def reads_every_ramp(policy: Policy) -> bool:
    """Whether `policy`'s state reads every ramp (pcee's counter, pabee's previous prediction,
    the ensemble's sum), so that ramps before `earliest_exit` must still run."""
    return bool(init_state(policy, 1))


def device_decide(policy: Policy, num_layers: int, layer, z, state, exit_layer, chosen):
    """`step` on ramp `layer` (1-based) inside a jitted exit loop: (state, exit_layer, chosen), the
    rows exiting here (all that remain at the last layer) taking `layer` and their prediction's
    outputs (`output`); rows that exited earlier (`exit_layer > 0`) keep theirs."""
    state, exits = step(policy, state, z, layer, jnp)
    fresh = (exits | (layer == num_layers)) & (exit_layer == 0)
    out = output(policy, state, z, layer, jnp)
    return state, jnp.where(fresh, layer, exit_layer), jnp.where(fresh[:, None], out, chosen)


def first_exit(exit_layer, exits, layer, xp=np):
    """Record `layer` for rows exiting now that had not exited (`exit_layer == 0`) before."""
    return xp.where((exit_layer == 0) & exits, layer, exit_layer)


# ---- stepping a whole [L, N, C] array of ramp logits ---------------------------------------------
def _check_logits(policy: Policy, logits) -> tuple[int, int]:
    L, N, C = np.shape(logits)
    if (L, C) != (policy.num_layers, policy.num_labels):
        raise ValueError(f"logits [L, N, C] = {logits.shape} do not match {policy} for "
                         f"L={policy.num_layers}, C={policy.num_labels}")
    return L, N


def simulate(policy: Policy, outputs) -> tuple[np.ndarray, np.ndarray]:
    """Step the policy on the host over cached logits `[L, N, C]` (or `RampOutputs` with the LTE's
    `[L, N]`), layer by layer.

    Returns `(exit_layer [N], prediction [N])`, exit layers 1-based, the prediction from ramp
    `exit_layer` (with the ensemble: from ramps 1..exit_layer). The reference the offline closed
    form is tested against.
    """
    logits, lte = split_outputs(outputs)
    logits = np.asarray(logits)
    L, N = _check_logits(policy, logits)
    state, exit_layer = init_state(policy, N), np.zeros(N, np.int64)
    chosen = np.zeros((N, policy.num_labels), np.float32)
    for layer in range(1, L + 1):
        z = logits[layer - 1] if lte is None else RampOutputs(logits[layer - 1], np.asarray(lte)[layer - 1])
        state, exits = step(policy, state, z, layer)
        exit_layer = first_exit(exit_layer, exits | (layer == L), layer)
        chosen = np.where((exit_layer == layer)[:, None], output(policy, state, z, layer), chosen)
    return exit_layer, prediction(chosen)


def scan_exits(policy: Policy, outputs) -> tuple[jax.Array, jax.Array]:
    """`simulate` on the device: `lax.scan` of `step` over layers; jittable, policy may be traced.

    Returns `(exit_layer [N] int32, prediction [N])`.
    """
    logits, lte = split_outputs(outputs)
    L, N = _check_logits(policy, logits)
    logits = jnp.asarray(logits)
    outputs = logits if lte is None else RampOutputs(logits, jnp.asarray(lte))

    def body(carry, xs):
        state, exit_layer, chosen = carry
        z, layer = xs
        state, exits = step(policy, state, z, layer, jnp)
        exit_layer = first_exit(exit_layer, exits | (layer == L), layer, jnp)
        chosen = jnp.where((exit_layer == layer)[:, None], output(policy, state, z, layer, jnp), chosen)
        return (state, exit_layer, chosen), None

    carry = (init_state(policy, N, jnp), jnp.zeros(N, jnp.int32), jnp.zeros(logits.shape[1:], jnp.float32))
    (_, exit_layer, chosen), _ = lax.scan(body, carry, (outputs, jnp.arange(1, L + 1, dtype=jnp.int32)))
    return exit_layer, prediction(chosen, jnp)
