"""The exit loop on the device, for any multi-exit model: one `lax.while_loop` over the layers,
the per-row exit state in its carry, stopping once every row has exited (`runners.run_on_device`).

A model gives its first step's result and one branch per later layer; layer i of the loop is
`lax.switch(i, branches)`, each branch reading its own layer's parameters as they are. Indexing
weights stacked on an L axis with the traced layer number instead would copy every layer's weights
before using them (at BERT-base shape, batch 1, that made running every layer far slower than the
dense model; with the switch it costs about what the dense model does). Branches must agree on the
carry's shapes; a model whose layers change shape (the ResNet's stages) carries one slot per shape.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxexit.exits import policies
from jaxexit.exits.policies import Policy

Branch = Callable[[object], tuple]  # carry -> (carry, ramp output)


def exit_loop(policy: Policy, first: tuple, branches: Sequence[Branch]) -> tuple[jax.Array, jax.Array]:
    """Run inside `jax.jit`. `first`: `(carry, z)` after layer 1 (`z` ramp 1's output: logits
    `[B, C]` or `RampOutputs`); `branches[i]`: layer i + 2 and its ramp, `carry -> (carry, z)`.
    Returns `(exit_layer [B] 1-based, outputs [B, C])` as `policies.device_decide` leaves them."""
    L = len(branches) + 1
    carry, z = first
    size = jax.tree_util.tree_leaves(z)[0].shape[0]  # logits, or RampOutputs(logits, lte)
    branches = list(branches) or [lambda carry: (carry, z)]  # L = 1: the loop never runs

    def decide(layer, z, state, exit_layer, chosen):  # layer: 1-based, traced
        return policies.device_decide(policy, L, layer, z, state, exit_layer, chosen)

    def body(loop):
        layer, carry, state, exit_layer, chosen = loop  # `layer` ramps decided so far
        carry, z = lax.switch(layer - 1, branches, carry)
        return (layer + 1, carry, *decide(layer + 1, z, state, exit_layer, chosen))

    def cond(loop):
        layer, _, _, exit_layer, _ = loop
        return (layer < L) & jnp.any(exit_layer == 0)

    state, exit_layer, chosen = decide(jnp.int32(1), z, policies.init_state(policy, size, jnp),
                                       jnp.zeros(size, jnp.int32),
                                       jnp.zeros((size, policy.num_labels), jnp.float32))
    _, _, _, exit_layer, chosen = lax.while_loop(cond, body, (jnp.int32(1), carry, state, exit_layer, chosen))
    return exit_layer, chosen
