"""The encoder run piecewise for early exit: `embed` once, then one layer and its ramp per step, the
layer's and ramp's parameters passed in, so one compiled step serves every layer.

A ramp reads its layer's output at the first token (`ramp_input` "cls"), which takes the layer's
keys and values over all tokens but its query, attention and feed-forward at one position only.
The first-token exit steps compute that first (about a sixth of a layer: the K and V projections)
and finish the layer for the other tokens, reusing those keys and values, only once the input has
not exited at its ramp: at the next layer's step. An input exiting at layer m so costs (m - 1)
layers and m K/V projections, not m layers; XLA makes the same saving in the dense model, whose last
layer is needed at one token. They read the layer's weights twice, though, which costs more than
it saves on small batches (results/exit_steps.md). Which steps a batch takes is decided in one place,
`StepPlan` (`EarlyExitModel.step_plan`); every exit path (host steps, pipelined latency, the device
loop) follows it. Deterministic (inference) only, but for `embed` and `layer_ramp_step`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxexit.exits import device, policies
from jaxexit.exits.policies import Policy
from jaxexit.exits.types import RampOutputs
from jaxexit.text.config import EncoderConfig
from jaxexit.text.modeling import (Embeddings, LearnedExit, Layer, Params, Ramp, attention_bias, layer_params,
                                   ramp_input, ramp_params)

PLAIN, FIRST_TOKEN, LAST = "plain", "first_token", "last"  # how one layer is stepped (`StepPlan.kind`)


class StepPlan(NamedTuple):
    """The exit steps a batch shape takes (hashable: a static argument of the jitted loops).

    `first_token`: the first-token exit steps (carry `(hidden, kv)`: a layer's input and keys and
    values, finished at the next step), else the plain layer step (carry: the hidden states).
    `last_at_first_token`: the plain steps compute layer L at the first token only (first-token
    ramps: nothing reads its other tokens)."""

    num_layers: int
    first_token: bool
    last_at_first_token: bool

    def kind(self, layer: int) -> str:
        """How 1-based `layer` is stepped: `FIRST_TOKEN`, `LAST` or `PLAIN`."""
        if self.first_token:
            return FIRST_TOKEN
        return LAST if self.last_at_first_token and layer == self.num_layers else PLAIN


def embed(cfg: EncoderConfig, params: Params, batch: dict, rng: jax.Array | None = None):
    """Embedding step: returns `(hidden [B, T, H], attention bias [B, 1, 1, T])`."""
    h = Embeddings(cfg).apply(
        {"params": params["backbone"]["embeddings"]},
        batch["input_ids"], batch["token_type_ids"], deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )
    return h, attention_bias(batch["attention_mask"])


def ramp_output(cfg: EncoderConfig, ramp_p: Params, features, rngs=None):
    """One ramp on its input `[B, H]`: logits `[B, C]`, or `RampOutputs(logits, lte)` with an LTE.
    Dropout only with `rngs`."""
    head = {"pooler": ramp_p["pooler"], "classifier": ramp_p["classifier"]}
    logits, pooled = Ramp(cfg).apply({"params": head}, features, deterministic=rngs is None, rngs=rngs,
                                     return_pooled=True)
    if "lte" not in ramp_p:
        return logits
    return RampOutputs(logits, LearnedExit(cfg).apply({"params": ramp_p["lte"]}, pooled))


def layer_ramp_step(cfg: EncoderConfig, layer_p: Params, ramp_p: Params, hidden, bias,
                    rng: jax.Array | None = None):
    """One layer and its ramp (the plain step): returns `(hidden [B, T, H], logits [B, C])`."""
    rngs = None if rng is None else {"dropout": jax.random.fold_in(rng, 0)}
    h = Layer(cfg).apply({"params": layer_p}, hidden, bias, deterministic=rng is None, rngs=rngs)
    rngs = None if rng is None else {"dropout": jax.random.fold_in(rng, 1)}
    return h, ramp_output(cfg, ramp_p, ramp_input(cfg, h, bias), rngs)


def first_token_exit(cfg: EncoderConfig, layer_p: Params, ramp_p: Params, hidden, bias):
    """Layer i at the first token and ramp i: returns `(kv, logits [B, C])`, `kv` being layer i's
    keys and values over every token (what finishing the layer needs)."""
    if cfg.ramp_input != "cls":
        raise ValueError(f"the first-token exit steps need ramp_input 'cls', not {cfg.ramp_input!r}")
    out, kv = Layer(cfg).apply({"params": layer_p}, hidden, bias, queries=hidden[:, :1], return_kv=True)
    return kv, ramp_output(cfg, ramp_p, out[:, 0])


def layer_exit(cfg: EncoderConfig, kind: str, prev_p, layer_p: Params, ramp_p: Params, carry, bias):
    """Layer i and ramp i as `kind` says: `(carry, z)`. `carry` is what the step of layer i - 1
    left (layer 1: the embeddings' hidden states, `prev_p` None); the first-token steps finish layer
    i - 1 (`prev_p`) for every token first."""
    if kind == FIRST_TOKEN:
        hidden = carry
        if prev_p is not None:
            hidden, kv = carry
            hidden = Layer(cfg).apply({"params": prev_p}, hidden, bias, kv=kv)
        kv, z = first_token_exit(cfg, layer_p, ramp_p, hidden, bias)
        return (hidden, kv), z
    if kind == LAST:
        return carry, first_token_exit(cfg, layer_p, ramp_p, carry, bias)[1]
    return layer_ramp_step(cfg, layer_p, ramp_p, carry, bias)


def first_exit_step(cfg: EncoderConfig, kind: str, params: Params, layer_p: Params, ramp_p: Params, batch: dict):
    """Embeddings (`params["backbone"]["embeddings"]`), then layer 1 and ramp 1 as `kind` says:
    `(carry, bias, z)`."""
    hidden, bias = embed(cfg, params, batch)
    carry, z = layer_exit(cfg, kind, None, layer_p, ramp_p, hidden, bias)
    return carry, bias, z


def exit_step(cfg: EncoderConfig, kind: str, prev_p, layer_p: Params, ramp_p: Params, carry, bias):
    """Layer i >= 2 and its ramp as `kind` says (`layer_exit`): `(carry, z)`. One compiled step per
    kind serves every layer."""
    return layer_exit(cfg, kind, prev_p, layer_p, ramp_p, carry, bias)


# ---- steps that decide: layer, ramp and the policy's step in one call (`runners.exit_one`) ----------
def decided_head_step(cfg: EncoderConfig, kind: str, head, layers_p: tuple, ramps_p: tuple, batch,
                      policy: Policy):
    """Embeddings (`head`: `{"backbone": {"embeddings": ...}}`) and layers 1..m (m = `len(layers_p)`,
    at most `policies.earliest_exit(policy)`: no row can exit before layer m), with the policy's
    steps on the ramps its state reads (`ramps_p[i]`; None for a ramp nothing reads) and on ramp m:
    (carry, bias, state, done, chosen). One call instead of m, as each call costs the host more than
    its layer's work (results/infer_speed.md). Layers before m are whole; layer m as `kind` says."""
    L, m = cfg.num_hidden_layers, len(layers_p)
    hidden, bias = embed(cfg, head, batch)
    size = batch["input_ids"].shape[0]
    state = policies.init_state(policy, size, jnp)
    exit_layer, chosen = jnp.zeros(size, jnp.int32), jnp.zeros((size, cfg.num_labels), jnp.float32)
    for i in range(m - 1):
        if ramps_p[i] is None:
            hidden = Layer(cfg).apply({"params": layers_p[i]}, hidden, bias)
        else:
            hidden, z = layer_ramp_step(cfg, layers_p[i], ramps_p[i], hidden, bias)
            state, exit_layer, chosen = policies.device_decide(policy, L, i + 1, z, state, exit_layer, chosen)
    carry, z = layer_exit(cfg, kind, None, layers_p[-1], ramps_p[-1], hidden, bias)
    state, exit_layer, chosen = policies.device_decide(policy, L, m, z, state, exit_layer, chosen)
    return carry, bias, state, jnp.all(exit_layer > 0), chosen


def decided_step(cfg: EncoderConfig, kind: str, prev_p, layer_p, ramp_p, carry, bias, policy: Policy,
                 state, done, chosen, layer):
    """Layer `layer` (traced, 2..L), its ramp and the policy's step, or nothing once `done` (a
    device flag the host has not read yet): (carry, state, done, chosen). One compiled step per
    `kind` serves every layer."""
    def run(operands):
        carry, state, chosen = operands
        carry, z = layer_exit(cfg, kind, prev_p, layer_p, ramp_p, carry, bias)
        exit_layer = jnp.zeros(chosen.shape[0], jnp.int32)  # none of the rows has exited
        state, exit_layer, chosen = policies.device_decide(policy, cfg.num_hidden_layers, layer, z, state,
                                                           exit_layer, chosen)
        return carry, state, jnp.all(exit_layer > 0), chosen

    def stay(operands):
        carry, state, chosen = operands
        return carry, state, done, chosen

    return lax.cond(done, stay, run, (carry, state, chosen))


# ---- on device: `jaxexit.exits.device.exit_loop` over these steps ------------------------------------
def device_exits(cfg: EncoderConfig, plan: StepPlan, params: Params, batch: dict, policy: Policy):
    """The exit loop on the device (jit with `cfg` and `plan` static): `(exit_layer [B], outputs [B, C])`."""
    L = cfg.num_hidden_layers
    layer_p = [layer_params(cfg, params, i) for i in range(L)]
    ramp_p = [ramp_params(cfg, params, i) for i in range(L)]
    carry, bias, z = first_exit_step(cfg, plan.kind(1), params, layer_p[0], ramp_p[0], batch)

    def branch(i):  # 0-based layer i >= 1
        prev = layer_p[i - 1] if plan.first_token else None
        return lambda carry: exit_step(cfg, plan.kind(i + 1), prev, layer_p[i], ramp_p[i], carry, bias)

    return device.exit_loop(policy, (carry, z), [branch(i) for i in range(1, L)])
