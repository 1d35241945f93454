"""Training losses shared by the text models and the multi-exit ResNet: each ramp's (exit's) loss
over a batch, and PABEE/PCEE's joint weights over ramps."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ramp_losses(logits: jax.Array, labels: jax.Array, weights: jax.Array, regression: bool) -> jax.Array:
    """Per-ramp weighted mean loss `[K]` from logits `[K, B, C]`: cross-entropy, or MSE (C = 1)."""
    if regression:
        per_example = jnp.square(logits[..., 0] - labels.astype(jnp.float32))
    else:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        per_example = -jnp.take_along_axis(logp, labels.astype(jnp.int32)[None, :, None], axis=-1)[..., 0]
    return (per_example * weights).sum(-1) / jnp.maximum(weights.sum(), 1.0)


def joint_weights(num_layers: int) -> jax.Array:
    """PABEE/PCEE's weights i / sum_i i for ramps i = 1..L."""
    w = jnp.arange(1, num_layers + 1, dtype=jnp.float32)
    return w / w.sum()
