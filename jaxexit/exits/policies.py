"""Exit policies: one small state machine per policy, stepped once per layer on that layer's ramp.

`step(policy, state, logits, layer, xp)` runs each policy's entry in `registry` (its only
definition), on

* the host (`xp=numpy`) on whichever rows are still in the batch; `take_rows` keeps the state in
  step with the rows the runner keeps;
* the device (`xp=jax.numpy`) inside `jit` / `lax.scan` / `lax.while_loop` (`scan_exits`); a
  `Policy` is a pytree whose thresholds are leaves, so changing them does not recompile;
* cached logits `[L, N, C]` (`simulate`); `jaxexit.exits.offline` evaluates parameter grids in
  closed form (each entry's `measure` and `fires`) and is tested equal to stepping this.

Layers are 1-based (`layer = 1..L`). `step` returns the rows whose exit condition holds at this
layer; no exit fires at layer `L` (an input that never exits uses ramp `L`). The caller keeps the
first layer at which a row exits (`first_exit`).

Every measure a policy thresholds is computed in float64 in every mode (on the device inside
`jax.enable_x64`), thresholds included, and the ends of each range are exact; see "per-ramp
measures" in measures.py.

Policies (docs/policies.md; each entry in registry.py), with `p = softmax(z)`, `C` classes:
  entropy(S)            exit when H(p) < S (nats)                              DeeBERT, BranchyNet
  pcee(patience, tau)   k = k + 1 if H(p) / ln C < tau else 0; exit at k = patience   PCEE-BERT
  maxprob(t)            exit when max p > t                                    Shallow-Deep
  pabee(patience[, delta])  k = k + 1 if argmax z == previous argmax else 0 (regression:
                        |z - previous z| < delta); exit at k = patience        PABEE
  static(k)             everyone exits at layer k                              budgeted exit
  berxit(t)             exit when the LTE's predicted error u < t              BERxiT (needs an LTE)
  margin(margin)        exit when p_(1) - p_(2) > margin (top-2 probability gap)

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

import dataclasses
import math
import numbers
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxexit.exits import registry
from jaxexit.exits.measures import (  # noqa: F401  (the public names of the measures)
    ensemble_term, entropy, from_bits_host, log_softmax, max_prob, normalized_entropy, predicted_error,
    prediction, split_outputs, threshold, to_bits)
from jaxexit.exits.registry import CONFIDENCES, pcee_confidence, top2_margin  # noqa: F401
from jaxexit.exits.types import RampOutputs

POLICIES = tuple(registry.REGISTRY)
# Policies that threshold a softmax confidence: degenerate for one output (regression).
SOFTMAX_POLICIES = tuple(n for n, s in registry.REGISTRY.items() if s.softmax)
# Every parameter name, and the thresholds among them (the others are integers: patience, k).
PARAM_NAMES = tuple(dict.fromkeys(p.name for s in registry.REGISTRY.values() for p in s.params))
FLOAT_PARAMS = tuple(dict.fromkeys(p.name for s in registry.REGISTRY.values() for p in s.params if p.kind is float))
_LABEL = re.compile(r"^(?P<name>[a-z]+)(?:\[(?P<confidence>[a-z]+)\])?(?P<ensemble>\+ensemble)?$")

State = dict  # name -> per-row array [B]; empty for stateless policies


def param_names(name: str, num_labels: int) -> tuple[str, ...]:
    """The parameters policy `name` takes (pabee's `delta` only for regression)."""
    return tuple(p.name for p in registry.get(name).params if num_labels == 1 or not p.regression_only)


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
        spec = registry.REGISTRY.get(self.name)
        if self.confidence != "entropy" and not (spec and spec.confidence):
            takes = ", ".join(n for n, s in registry.REGISTRY.items() if s.confidence)
            raise ValueError(f"confidence applies to {takes} only, not to {self.name!r}")
        if not isinstance(self.ensemble, bool):
            raise ValueError(f"ensemble must be True or False, got {self.ensemble!r}")
        checked = _validate(self.name, self.num_layers, self.num_labels, dict(self.params), self.confidence)
        object.__setattr__(self, "params", tuple(sorted(checked.items())))

    @property
    def needs_lte(self) -> bool:
        """Whether the policy reads the learning-to-exit module's output (berxit, pcee[learned])."""
        return registry.get(self.name).needs_lte or self.confidence == "learned"

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


def _flatten(p: Policy):
    # Thresholds travel as the two 32-bit halves of their float64 bit pattern (measures.to_bits).
    keys = tuple(k for k, _ in p.params)
    leaves = [to_bits(v) if k in FLOAT_PARAMS else v for k, v in p.params]
    return leaves, (p.name, p.num_layers, p.num_labels, keys, p.confidence, p.ensemble)


def _unflatten(aux, leaves) -> Policy:
    # Bypasses validation: under jit the leaves are tracers (or jax's placeholders); concrete bit
    # patterns (a tree_map over a Policy) turn back into floats.
    name, num_layers, num_labels, keys, confidence, ensemble = aux
    values = [from_bits_host(v) if k in FLOAT_PARAMS else v for k, v in zip(keys, leaves)]
    p = object.__new__(Policy)
    for field, value in (("name", name), ("num_layers", num_layers), ("num_labels", num_labels),
                         ("params", tuple(zip(keys, values))), ("confidence", confidence), ("ensemble", ensemble)):
        object.__setattr__(p, field, value)
    return p


jax.tree_util.register_pytree_node(Policy, _flatten, _unflatten)


def _validate(name: str, num_layers: int, num_labels: int, params: Mapping[str, Any],
              confidence: str = "entropy") -> dict:
    spec = registry.get(name)
    L = _integer("num_layers", num_layers, low=1)
    C = _integer("num_labels", num_labels, low=1)
    if C == 1 and spec.softmax and confidence != "learned":
        raise ValueError(
            f"policy {name!r} thresholds softmax confidence, which is constant for a regression "
            f"task (num_labels=1); use 'pabee' (with delta) or 'static'"
        )
    expected = param_names(name, C)
    if set(params) != set(expected):
        extra = sorted(set(params) - set(expected))
        missing = sorted(set(expected) - set(params))
        only = [k for k in extra if (spec.param(k) or registry.Param(k, float, 0)).regression_only]
        hint = f" ({only[0]} applies to regression only)" if only else ""
        raise ValueError(f"policy {name!r} takes parameters {expected}; missing {missing}, unexpected {extra}{hint}")
    out = {}
    for key, value in params.items():
        p = spec.param(key)
        high = L if p.high == "L" else p.high
        if p.kind is int:
            out[key] = _integer(key, value, low=p.low, high=high)
        else:
            out[key] = _real(key, value, low=p.low, high=math.inf if high is None else high)
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


# ---- the state machines --------------------------------------------------------------------------
def init_state(policy: Policy, batch_size: int, xp=np) -> State:
    """The state before layer 1 for `batch_size` rows."""
    state = {"ens": xp.zeros((batch_size, policy.num_labels), xp.float32)} if policy.ensemble else {}
    return {**state, **registry.get(policy.name).init(policy, batch_size, xp)}


def take_rows(state: State, rows) -> State:
    """The state of the rows `rows` (indices or a boolean mask), for a runner that drops rows."""
    return {k: v[rows] for k, v in state.items()}


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
    new, exits = registry.get(policy.name).step(policy, state, logits, lte, layer, xp)
    if policy.ensemble:
        new = {**new, "ens": state["ens"] + ensemble_term(logits, xp)}
    return new, exits & (layer < policy.num_layers)


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
    first = registry.get(policy.name).earliest(policy)
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
