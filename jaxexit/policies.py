"""Exit policies: one small state machine per policy, stepped once per layer on that layer's ramp.

`step(policy, state, logits, layer, xp)` is the only definition of each policy. It runs

* live on the host (`xp=numpy`) on whichever rows are still in the batch; `take_rows` keeps the
  state in step with the rows the runner keeps;
* on the device (`xp=jax.numpy`) inside `jit` / `lax.scan` / `lax.while_loop` (`scan_exits`); a
  `Policy` is a pytree whose thresholds are leaves, so changing them does not recompile;
* offline over cached logits `[L, N, C]` (`simulate`); `jaxexit.offline` evaluates parameter
  grids in closed form and is tested equal to stepping this.

Layers are 1-based (`layer = 1..L`). `step` returns the rows whose exit condition holds at this
layer; no exit fires at layer `L` (an input that never exits uses ramp `L`). The caller keeps the
first layer at which a row exits (`first_exit`).

Policies (DESIGN.md, "Exit policies"), with `p = softmax(z)`, `C` classes:
  entropy(S)            exit when H(p) < S (nats)                              DeeBERT, BranchyNet
  pcee(patience, tau)   k = k + 1 if H(p) / ln C < tau else 0; exit at k = patience   PCEE-BERT
  maxprob(t)            exit when max p > t                                    Shallow-Deep
  pabee(patience[, delta])  k = k + 1 if argmax z == previous argmax else 0 (regression:
                        |z - previous z| < delta); exit at k = patience        PABEE
  static(k)             everyone exits at layer k                              budgeted exit
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

POLICIES = ("entropy", "pcee", "maxprob", "pabee", "static")
# Policies that threshold a softmax confidence: degenerate for one output (regression).
SOFTMAX_POLICIES = ("entropy", "pcee", "maxprob")

State = dict  # name -> per-row array [B]; empty for stateless policies


def param_names(name: str, num_labels: int) -> tuple[str, ...]:
    """The parameters policy `name` takes (pabee's `delta` only for regression)."""
    if name == "pabee":
        return ("patience", "delta") if num_labels == 1 else ("patience",)
    return {"entropy": ("S",), "pcee": ("patience", "tau"), "maxprob": ("t",), "static": ("k",)}[name]


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

    def __post_init__(self):
        items = dict(self.params)
        checked = _validate(self.name, self.num_layers, self.num_labels, items)
        object.__setattr__(self, "params", tuple(sorted(checked.items())))

    def __getitem__(self, key: str):
        for k, v in self.params:
            if k == key:
                return v
        raise KeyError(f"policy {self.name!r} has no parameter {key!r}")

    def as_dict(self) -> dict:
        """`{"policy": name, **params}`, for result files."""
        return {"policy": self.name, **dict(self.params)}

    def __str__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params)})"


def make_policy(name: str, num_layers: int, num_labels: int, **params) -> Policy:
    """`make_policy("pcee", 12, 2, patience=2, tau=0.2)`; raises ValueError on bad settings."""
    return Policy(name, num_layers, num_labels, tuple(params.items()))


def _flatten(p: Policy):
    keys = tuple(k for k, _ in p.params)
    return [v for _, v in p.params], (p.name, p.num_layers, p.num_labels, keys)


def _unflatten(aux, leaves) -> Policy:
    # Bypasses validation: under jit the leaves are tracers (or jax's placeholders).
    name, num_layers, num_labels, keys = aux
    p = object.__new__(Policy)
    for field, value in (("name", name), ("num_layers", num_layers), ("num_labels", num_labels),
                         ("params", tuple(zip(keys, leaves)))):
        object.__setattr__(p, field, value)
    return p


jax.tree_util.register_pytree_node(Policy, _flatten, _unflatten)


def _validate(name: str, num_layers: int, num_labels: int, params: Mapping[str, Any]) -> dict:
    if name not in POLICIES:
        raise ValueError(f"unknown exit policy {name!r}; choose one of {POLICIES}")
    L = _integer("num_layers", num_layers, low=1)
    C = _integer("num_labels", num_labels, low=1)
    if C == 1 and name in SOFTMAX_POLICIES:
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
            high = 1.0 if key in ("tau", "t") else math.inf
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
def _float(logits, xp):
    # numpy computes in float64 (cheap, and host and offline agree bit for bit); jnp in its
    # default float, so the step traces without x64.
    if xp is np:
        return np.ascontiguousarray(logits, dtype=np.float64)
    return xp.asarray(logits, dtype=jnp.result_type(float))


def log_softmax(logits, xp=np):
    """Stable log-softmax over the last axis: finite for huge logits, -inf only where p = 0.

    A row needs one finite logit; +inf or all -inf give NaN, which passes no threshold.
    """
    z = _float(logits, xp)
    s = z - xp.max(z, axis=-1, keepdims=True)
    return s - xp.log(xp.sum(xp.exp(s), axis=-1, keepdims=True))


def entropy(logits, xp=np):
    """H(softmax(z)) in nats over the last axis; 0 * log 0 counts as 0 (no NaN)."""
    logp = log_softmax(logits, xp)
    p = xp.exp(logp)
    return -xp.sum(p * xp.where(p > 0, logp, 0.0), axis=-1)


def normalized_entropy(logits, xp=np):
    """H / ln C, in [0, 1] (PCEE's confidence measure)."""
    return entropy(logits, xp) / math.log(logits.shape[-1])


def max_prob(logits, xp=np):
    return xp.exp(xp.max(log_softmax(logits, xp), axis=-1))


def prediction(logits, xp=np):
    """A ramp's prediction: argmax (int32) for classification, the scalar for regression (C = 1)."""
    if logits.shape[-1] == 1:
        return _float(logits, xp)[..., 0]
    return xp.argmax(logits, axis=-1).astype(xp.int32)


# ---- the state machines --------------------------------------------------------------------------
def init_state(policy: Policy, batch_size: int, xp=np) -> State:
    """The state before layer 1 for `batch_size` rows."""
    zeros = xp.zeros(batch_size, xp.int32)
    if policy.name == "pcee":
        return {"count": zeros}
    if policy.name == "pabee":
        prev = zeros if policy.num_labels > 1 else _float(xp.zeros(batch_size), xp)
        return {"count": zeros, "prev": prev}
    return {}


def take_rows(state: State, rows) -> State:
    """The state of the rows `rows` (indices or a boolean mask), for a runner that drops rows."""
    return {k: v[rows] for k, v in state.items()}


def _entropy(policy, state, z, layer, xp):
    return state, entropy(z, xp) < policy["S"]


def _maxprob(policy, state, z, layer, xp):
    return state, max_prob(z, xp) > policy["t"]


def _pcee(policy, state, z, layer, xp):
    count = xp.where(normalized_entropy(z, xp) < policy["tau"], state["count"] + 1, 0)
    return {"count": count}, count >= policy["patience"]  # first True is at count == patience


def _pabee(policy, state, z, layer, xp):
    pred = prediction(z, xp)
    if policy.num_labels == 1:
        agree = xp.abs(pred - state["prev"]) < policy["delta"]
    else:
        agree = pred == state["prev"]
    count = xp.where(agree & (layer > 1), state["count"] + 1, 0)  # layer 1 has nothing to agree with
    return {"count": count, "prev": pred}, count >= policy["patience"]


def _static(policy, state, z, layer, xp):
    return state, xp.zeros(z.shape[0], bool) | (layer >= policy["k"])


_STEPS = {"entropy": _entropy, "pcee": _pcee, "maxprob": _maxprob, "pabee": _pabee, "static": _static}


def step(policy: Policy, state: State, logits, layer, xp=np) -> tuple[State, Any]:
    """Advance the policy by one layer: `logits [B, C]` is ramp `layer`'s output (1-based).

    Returns `(new state, exits [B] bool)`. `exits` is False everywhere at layer `L`. Pass
    `xp=jax.numpy` to trace it (`layer` may then be a traced integer).
    """
    logits = xp.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != policy.num_labels:
        raise ValueError(f"step takes one layer's logits [B, {policy.num_labels}], got shape {logits.shape}")
    if isinstance(layer, numbers.Integral) and not 1 <= layer <= policy.num_layers:
        raise ValueError(f"layer must be in 1..{policy.num_layers}, got {layer}")
    state, exits = _STEPS[policy.name](policy, state, logits, layer, xp)
    return state, exits & (layer < policy.num_layers)


def first_exit(exit_layer, exits, layer, xp=np):
    """Record `layer` for rows exiting now that had not exited (`exit_layer == 0`) before."""
    return xp.where((exit_layer == 0) & exits, layer, exit_layer)


# ---- stepping a whole [L, N, C] array of ramp logits ---------------------------------------------
def _check_logits(policy: Policy, logits) -> tuple[int, int]:
    L, N, C = logits.shape
    if (L, C) != (policy.num_layers, policy.num_labels):
        raise ValueError(f"logits [L, N, C] = {logits.shape} do not match {policy} for "
                         f"L={policy.num_layers}, C={policy.num_labels}")
    return L, N


def simulate(policy: Policy, logits) -> tuple[np.ndarray, np.ndarray]:
    """Step the policy on the host over cached logits `[L, N, C]`, layer by layer.

    Returns `(exit_layer [N], prediction [N])`, exit layers 1-based, the prediction from ramp
    `exit_layer`. The reference the offline closed form is tested against.
    """
    logits = np.asarray(logits)
    L, N = _check_logits(policy, logits)
    state, exit_layer = init_state(policy, N), np.zeros(N, np.int64)
    for layer in range(1, L + 1):
        state, exits = step(policy, state, logits[layer - 1], layer)
        exit_layer = first_exit(exit_layer, exits, layer)
    exit_layer = np.where(exit_layer == 0, L, exit_layer)
    return exit_layer, prediction(logits[exit_layer - 1, np.arange(N)])


def scan_exits(policy: Policy, logits) -> tuple[jax.Array, jax.Array]:
    """`simulate` on the device: `lax.scan` of `step` over layers; jittable, policy may be traced.

    Returns `(exit_layer [N] int32, prediction [N])`.
    """
    L, N = _check_logits(policy, logits)
    logits = jnp.asarray(logits)

    def body(carry, xs):
        state, exit_layer, chosen = carry
        z, layer = xs
        state, exits = step(policy, state, z, layer, jnp)
        exit_layer = first_exit(exit_layer, exits, layer, jnp)
        chosen = jnp.where((exit_layer == layer)[:, None], z, chosen)
        return (state, exit_layer, chosen), None

    carry = (init_state(policy, N, jnp), jnp.zeros(N, jnp.int32), logits[-1])
    (_, exit_layer, chosen), _ = lax.scan(body, carry, (logits, jnp.arange(1, L + 1, dtype=jnp.int32)))
    return jnp.where(exit_layer == 0, L, exit_layer), prediction(chosen, jnp)
