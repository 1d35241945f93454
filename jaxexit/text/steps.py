"""The text models' training losses and jitted training / evaluation steps, one per `Stage`.

`two_stage` (DeeBERT): BACKBONE trains embeddings, layers and ramp L on L_L; RAMPS trains ramps
1..L-1 on sum_{i<L} L_i with gradients taken with respect to the ramp subtree only (the backbone
runs forward, without a backward pass, and layer L is not run at all). JOINT (PABEE / PCEE):
everything trains on sum_i i * L_i / sum_i i. ALTERNATE (BERxiT): everything trains, on L_L at
even steps and on sum_i L_i (every ramp, the last included) at odd steps. LTE (BERxiT's learning
to exit) trains the LTE module alone, on the frozen model's ramps: it predicts each ramp's error,
target 1 - exp(-e_i) (docs/training.md), loss the mean squared difference over ramps; gradients
are taken with respect to the LTE subtree only. The per-ramp losses and joint weights are shared
with vision (jaxexit/training/losses.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxexit.text import modeling
from jaxexit.text.config import EncoderConfig
from jaxexit.training import optim
from jaxexit.training.losses import joint_weights, ramp_losses
from jaxexit.training.stages import Stage


def _inputs(batch):
    return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]


def stage_loss(cfg: EncoderConfig, stage: Stage, params, batch, rng, step=0):
    """The scalar training loss of `stage` (JOINT, BACKBONE, ALTERNATE) at optimiser step `step`
    (0-based; alternate's objective depends on its parity) and the per-ramp losses it used."""
    module = modeling.MultiExitEncoder(cfg)
    L = cfg.num_hidden_layers
    rng_backbone, rng_ramps = jax.random.split(rng)
    train = dict(deterministic=False)
    args = (batch["label"], batch["weight"], cfg.is_regression)
    if stage == Stage.BACKBONE:
        hidden = module.apply({"params": {"backbone": params["backbone"]}}, *_inputs(batch), **train,
                              rngs={"dropout": rng_backbone}, method="encode")
        features = modeling.ramp_input(cfg, hidden[-1], modeling.attention_bias(batch["attention_mask"]))
        logits = modeling.Ramp(cfg).apply({"params": modeling.ramp_params(cfg, params, L - 1)}, features,
                                          **train, rngs={"dropout": rng_ramps})
        losses = ramp_losses(logits[None], *args)
        return losses[0], losses
    if stage in (Stage.JOINT, Stage.ALTERNATE):
        logits, _ = module.apply({"params": params}, *_inputs(batch), **train,
                                 rngs={"dropout": rng_backbone})
        losses = ramp_losses(logits, *args)
        if stage == Stage.ALTERNATE:
            return jnp.where(step % 2 == 0, losses[-1], losses.sum()), losses
        return (joint_weights(L) * losses).sum(), losses
    raise ValueError("the RAMPS stage takes ramp parameters only: use stage2_loss")


def stage2_loss(cfg: EncoderConfig, ramps, features, batch, rng):
    """Sum of ramps 1..L-1's losses, as a function of the ramp subtree alone."""
    logits = modeling.MultiExitEncoder(cfg).apply(
        {"params": {"ramps": ramps}}, features, deterministic=False, rngs={"dropout": rng}, method="classify"
    )
    losses = ramp_losses(logits, batch["label"], batch["weight"], cfg.is_regression)
    return losses.sum(), losses


def lte_targets(logits: jax.Array, labels: jax.Array, regression: bool) -> jax.Array:
    """BERxiT's target for the LTE at each ramp `[K, B]`: 1 - exp(-e), e = 0.99 - 0.98 [correct]
    (classification) or the squared error (regression)."""
    if regression:
        e = jnp.square(logits[..., 0] - labels.astype(jnp.float32))
    else:
        e = 0.99 - 0.98 * (jnp.argmax(logits, -1) == labels.astype(jnp.int32)[None]).astype(jnp.float32)
    return 1.0 - jnp.exp(-e)


def lte_loss(cfg: EncoderConfig, lte, pooled, targets, weights):
    """Mean squared difference between sigmoid(LTE) and the targets: per ramp `[K]` and their mean."""
    u = jax.nn.sigmoid(modeling.LearnedExit(cfg).apply({"params": lte}, pooled))
    per_ramp = (jnp.square(u - targets) * weights).sum(-1) / jnp.maximum(weights.sum(), 1.0)
    return per_ramp.mean(), per_ramp


def lte_inputs(cfg: EncoderConfig, params, batch):
    """The frozen model's ramp logits `[L, B, C]` and pooled outputs `[L, B, H]` (eval mode: the
    LTE learns the errors the ramps make at inference), as constants."""
    module = modeling.MultiExitEncoder(cfg)
    frozen = {"backbone": params["backbone"], "ramps": params["ramps"]}
    hidden = module.apply({"params": frozen}, *_inputs(batch), method="encode")
    features = modeling.ramp_input(cfg, hidden[1:], modeling.attention_bias(batch["attention_mask"]))
    logits, pooled = module.apply({"params": frozen}, features, method=lambda m, f: m.ramps(f, True, return_pooled=True))
    return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(pooled)


def train_step(cfg: EncoderConfig, stage: Stage, tx: optax.GradientTransformation, labels, state, batch, rng):
    """One optimiser step. `state` is `{"params", "opt_state", "step"}`; returns (state, metrics)."""
    params = state["params"]
    rng = jax.random.fold_in(rng, state["step"])
    if stage == Stage.RAMPS:
        rng_backbone, rng_ramps = jax.random.split(rng)
        hidden = modeling.MultiExitEncoder(cfg).apply(
            {"params": {"backbone": params["backbone"]}}, *_inputs(batch), deterministic=False,
            rngs={"dropout": rng_backbone}, method="encode", num_layers=cfg.num_hidden_layers - 1,
        )
        features = modeling.ramp_input(cfg, hidden[1:], modeling.attention_bias(batch["attention_mask"]))
        features = jax.lax.stop_gradient(features)  # a constant: no backward into the backbone
        (loss, losses), ramp_grads = jax.value_and_grad(
            functools.partial(stage2_loss, cfg), has_aux=True
        )(params["ramps"], features, batch, rng_ramps)
        grads = {**_zeros_except(params, "ramps"), "ramps": ramp_grads}
    elif stage == Stage.LTE:
        logits, pooled = lte_inputs(cfg, params, batch)
        targets = lte_targets(logits, batch["label"], cfg.is_regression)
        (loss, losses), lte_grads = jax.value_and_grad(functools.partial(lte_loss, cfg), has_aux=True)(
            params["lte"], pooled, targets, batch["weight"])
        grads = {**_zeros_except(params, "lte"), "lte": lte_grads}
    else:
        (loss, losses), grads = jax.value_and_grad(
            functools.partial(stage_loss, cfg, stage), has_aux=True
        )(params, batch, rng, state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"params": optim.apply_updates(params, updates, labels), "opt_state": opt_state,
                 "step": state["step"] + 1}
    return new_state, {"loss": loss, "ramp_losses": losses}


def _zeros_except(params, key: str) -> dict:
    """Zero gradients for every top-level subtree but `key` (frozen: the partition ignores them)."""
    return {k: jax.tree_util.tree_map(jnp.zeros_like, v) for k, v in params.items() if k != key}


def eval_lte(cfg: EncoderConfig, params, batch):
    """The learning-to-exit module's predicted errors `[L, B]` (after the sigmoid) in eval mode."""
    _, pooled = lte_inputs(cfg, params, batch)
    return jax.nn.sigmoid(modeling.LearnedExit(cfg).apply({"params": params["lte"]}, pooled))


def eval_logits(cfg: EncoderConfig, params, batch):
    """Every ramp's logits `[L, B, C]` in eval mode."""
    logits, _ = modeling.MultiExitEncoder(cfg).apply({"params": params}, *_inputs(batch))
    return logits
