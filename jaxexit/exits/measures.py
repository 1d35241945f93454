"""What exit policies threshold, per ramp and row, at float64 in every mode; and the thresholds.

Each function takes `xp=numpy` (host, offline) or `xp=jax.numpy` (inside `jit`); on the device the
float64 work runs inside `jax.enable_x64`. Measures used by one policy only may live beside its
registry entry (`registry.top2_margin`); they follow the same rules.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxexit.exits.types import RampOutputs


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
def x64(xp):
    """`jax.enable_x64` on the device, nothing on the host."""
    return jax.enable_x64(True) if xp is not np else contextlib.nullcontext()


def float64(logits, xp):
    return xp.asarray(logits).astype(xp.float64)


def uniform(logits, xp):
    """Rows whose logits are all equal."""
    z = xp.asarray(logits)
    return xp.max(z, axis=-1) == xp.min(z, axis=-1)


def pin(value, exact, xp, at: float, inside: float):
    """`at` where `exact` holds; every other row's value clipped to `inside` (one ulp within `at`)."""
    clip = xp.minimum if inside < at else xp.maximum
    return xp.where(exact, at, clip(value, inside))


def log_softmax(logits, xp=np):
    """Stable log-softmax over the last axis in float64: finite for huge logits, -inf only where p = 0.

    A row needs one finite logit; +inf or all -inf give NaN, which passes no threshold.
    """
    with x64(xp):
        z = float64(logits, xp)
        s = z - xp.max(z, axis=-1, keepdims=True)
        return s - xp.log(xp.sum(xp.exp(s), axis=-1, keepdims=True))


def entropy(logits, xp=np):
    """H(softmax(z)) in nats over the last axis, float64; 0 * log 0 counts as 0 (no NaN)."""
    with x64(xp):
        logp = log_softmax(logits, xp)
        p = xp.exp(logp)
        h = -xp.sum(p * xp.where(p > 0, logp, 0.0), axis=-1)
        top = math.log(logits.shape[-1])
        return pin(h, uniform(logits, xp), xp, top, math.nextafter(top, 0.0))


def normalized_entropy(logits, xp=np):
    """H / ln C, in [0, 1] (PCEE's confidence measure), float64."""
    with x64(xp):
        c = entropy(logits, xp) / math.log(logits.shape[-1])
        return pin(c, uniform(logits, xp), xp, 1.0, math.nextafter(1.0, 0.0))


def max_prob(logits, xp=np):
    """max softmax(z) over the last axis, float64, in [1 / C, 1]."""
    with x64(xp):
        m = xp.exp(xp.max(log_softmax(logits, xp), axis=-1))
        low = 1.0 / logits.shape[-1]
        return pin(m, uniform(logits, xp), xp, low, math.nextafter(low, 1.0))


def predicted_error(lte, xp=np):
    """The LTE's predicted error u = sigmoid(lte output) in float64, strictly inside (0, 1), so that
    t (or tau) = 0 never fires and 1 always does, in every mode."""
    with x64(xp):
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
        return float64(logits, xp)[..., 0] if xp is np else logits[..., 0]
    return xp.argmax(logits, axis=-1).astype(xp.int32)


def ensemble_term(logits, xp=np):
    """What one ramp adds to the ensemble sum: its probabilities (float64, rounded once to
    float32, so that every mode adds the same numbers), or its output for regression."""
    if logits.shape[-1] == 1:
        return xp.asarray(logits).astype(xp.float32)
    with x64(xp):
        return xp.exp(log_softmax(logits, xp)).astype(xp.float32)


# ---- thresholds at float64 -----------------------------------------------------------------------
# A `Policy` travels through `jit` with each float parameter as the two 32-bit halves of its
# float64 bit pattern: outside x64, jit would turn a float leaf into float32, and `threshold`
# could not compare at float64.
def to_bits(value) -> np.ndarray:
    if isinstance(value, (np.ndarray, jax.Array)) or not isinstance(value, numbers.Real):
        return value  # already bits (or a placeholder object of jax's)
    bits = int(np.float64(value).view(np.uint64))
    return np.array([bits >> 32, bits & 0xFFFFFFFF], np.uint32)


def from_bits_host(leaf):
    if isinstance(leaf, jax.core.Tracer) or not hasattr(leaf, "shape") or np.shape(leaf) != (2,):
        return leaf
    hi, lo = (int(x) for x in np.asarray(leaf, np.uint64))
    return float(np.uint64((hi << 32) | lo).view(np.float64))


def threshold(policy, key: str, xp=np):
    """Float parameter `key` at float64: a Python float on the host; on the device (inside
    `jax.enable_x64`, as `step` runs) a float64 scalar, decoded from its bit pattern when the
    policy was passed through `jit` as an argument."""
    value = policy[key]
    if xp is np or isinstance(value, numbers.Real):
        return value if xp is np else jnp.float64(value)
    bits = jnp.asarray(value).astype(jnp.uint64)
    return lax.bitcast_convert_type((bits[0] << 32) | bits[1], jnp.float64)


def holds(measure, z, above: bool, policy, key: str, xp):
    """`measure(z) > policy[key]` (above) or `< policy[key]`, both at float64 in every mode. On the
    device only this runs under `jax.enable_x64`: operations whose lowering reads the x64 flag
    (argmax's index type) stay outside, since the enclosing jit lowers after the context ends."""
    with x64(xp):
        value, limit = measure(z, xp), threshold(policy, key, xp)
        return value > limit if above else value < limit
