"""Which parameters train, and how: one label function over parameter paths, one optax partition.

Stage 2 of DeeBERT freezes everything stage 1 trained. Freezing is `optax.multi_transform` with
`set_to_zero()` for the "frozen" label, so frozen leaves get no optimiser state at all (adamw's
mu/nu hold `MaskedNode` there), unlike `optax.masked(adamw, mask)` alone, which would pass the
raw gradients of unmasked leaves through as updates.
"""

from __future__ import annotations

import re

import jax
import optax

from jaxexit.training.stages import Stage

TRAINABLE, FROZEN = "trainable", "frozen"


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def stage_rules(stage: Stage, num_layers: int) -> list[tuple[str, str]]:
    """(regex over "backbone/.../kernel" paths, label) rules; the first match wins.

    JOINT and ALTERNATE train everything; BACKBONE trains the backbone and ramp L (with the shared
    pooler, if any); RAMPS trains ramps 1..L-1 only; LTE trains the learning-to-exit module only
    (frozen in every other stage).
    """
    last = rf"ramps/{num_layers - 1}/"
    lte = (r"^lte/", FROZEN)  # the learning-to-exit module trains in the LTE stage only
    if stage in (Stage.JOINT, Stage.ALTERNATE):
        return [(r"^(backbone|ramps)/", TRAINABLE), lte]
    if stage == Stage.BACKBONE:
        return [(r"^backbone/", TRAINABLE), (last, TRAINABLE), (r"^ramps/pooler/", TRAINABLE), (r"^ramps/", FROZEN),
                lte]
    if stage == Stage.RAMPS:
        return [(r"^backbone/", FROZEN), (last, FROZEN), (r"^ramps/pooler/", FROZEN), (r"^ramps/\d+/", TRAINABLE),
                lte]
    if stage == Stage.LTE:
        return [(r"^lte/", TRAINABLE), (r"^(backbone|ramps)/", FROZEN)]
    raise ValueError(f"stage must be 0 (joint), 1, 2, 3 (alternate) or 4 (learning to exit), got {stage}")


def param_labels(params, stage: Stage, num_layers: int):
    """A pytree of "trainable"/"frozen" with the structure of `params`; every leaf must match a rule."""
    rules = [(re.compile(pattern), label) for pattern, label in stage_rules(stage, num_layers)]

    def label(keys, _):
        path = _path(keys)
        for pattern, lab in rules:
            if pattern.search(path):
                return lab
        raise ValueError(f"no training rule covers parameter {path} (stage {stage})")

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params):
    """True where AdamW weight decay applies: not biases, not LayerNorm parameters."""
    return jax.tree_util.tree_map_with_path(
        lambda keys, _: not (_path(keys).endswith("/bias") or "/LayerNorm/" in _path(keys)), params
    )


def schedule(lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then linear decay to 0 at `total_steps`."""
    warmup = int(round(total_steps * warmup_ratio))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))],
        [warmup],
    )


def make_optimizer(params, *, stage: Stage, num_layers: int, lr: float, total_steps: int, warmup_ratio: float,
                   weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   max_grad_norm: float = 1.0) -> tuple[optax.GradientTransformation, object]:
    """The stage's optimizer and its label tree: AdamW (+ clipping) on trainable leaves, zero on frozen."""
    labels = param_labels(params, stage, num_layers)
    adamw = optax.adamw(schedule(lr, total_steps, warmup_ratio), b1=b1, b2=b2, eps=eps,
                        weight_decay=weight_decay, mask=decay_mask)
    trainable = optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw) if max_grad_norm > 0 else adamw
    return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels), labels


def apply_updates(params, updates, labels):
    """`optax.apply_updates` on trainable leaves only; frozen leaves are returned as they are
    (bit-identical: not even `p + 0`, which would turn -0.0 into +0.0)."""
    return jax.tree_util.tree_map(
        lambda p, u, lab: p if lab == FROZEN else (p + u).astype(p.dtype), params, updates, labels
    )
