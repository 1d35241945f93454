"""Early exit on a multi-exit ResNet (PCEE-BERT section 4.6.4): the text model's policies and runners
on images, unchanged.

`VisionExitModel` is a `jaxexit.exits.types.RampModel`, so every runner takes it with uint8 images
`[N, H, W, 3]` as the split (`runners.run_latency(model, policy, pictures)`, `run_batched`,
`run_on_device`, `cached_logits`, `run_full_latency`, `run_full_batched`), all giving the same exits
as `jaxexit.exits.offline` on `cached_logits`. A batch is `{"images": float32 [B, H, W, 3]}`,
normalised as the run was trained (`prepare`). The block step is compiled once per block structure
and input shape (`resnet.block_step`: 5 programs for ResNet-56's 27 blocks), not once per block.
Latency mode decides on the host (the model has no `decided_steps`); the device loop is
`jaxexit.exits.device.exit_loop`, the carry holding one slot per block output shape, since the blocks
change shape between stages.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxexit.exits import device
from jaxexit.exits.policies import Policy
from jaxexit.training.checkpoint import read_json
from jaxexit.vision import images, resnet
from jaxexit.vision.resnet import ResNetConfig, Variables


class VisionExitModel:
    """A multi-exit ResNet in eval mode (BatchNorm's running statistics) with its normalisation."""

    def __init__(self, config: ResNetConfig, variables: Variables,
                 normalization: tuple[Sequence[float], Sequence[float]] = (images.CIFAR10_MEAN, images.CIFAR10_STD),
                 class_names: Sequence[str] = (), source: str | None = None):
        self.config = config
        self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self.mean, self.std = (tuple(float(x) for x in v) for v in normalization)
        self.class_names = tuple(class_names)
        self.source = source

    @classmethod
    def from_run(cls, path: str | os.PathLike) -> "VisionExitModel":
        """A finished `train/train_vision.py` run (its model, normalisation and class names)."""
        from jaxexit.vision import train as vision_train

        config, variables = vision_train.load_run(path)
        summary = read_json(Path(path) / "summary.json")
        norm = summary["normalization"]
        return cls(config, variables, (norm["mean"], norm["std"]), summary.get("class_names", ()), str(path))

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_labels(self) -> int:
        return self.config.num_classes

    @property
    def has_lte(self) -> bool:
        """No learning-to-exit module (BERxiT's) on the ResNet."""
        return False

    def prepare(self, pictures: np.ndarray) -> dict:
        """uint8 images `[B, H, W, 3]` -> a batch `{"images": float32, normalised}`."""
        pictures = np.asarray(pictures)
        if pictures.ndim != 4 or pictures.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {pictures.shape}")
        return {"images": images.normalize(pictures, self.mean, self.std)}

    def inputs(self, pictures: np.ndarray, rows) -> dict:
        """The batch of images `rows` of `pictures` (the runners' `RampModel.inputs`)."""
        return self.prepare(np.asarray(pictures)[np.asarray(rows)])

    def ramp_steps(self, batch: dict):
        """Exit 1..L logits `[B, C]` one block at a time, as `EarlyExitModel.ramp_steps`: a generator;
        `send(rows)` (an index array) instead of `next` keeps only those rows for the blocks that follow."""
        h = resnet.stem(self.config, self.variables, jnp.asarray(batch["images"]))
        for layer in range(self.num_layers):
            h, logits = resnet.block_step(self.config, self.variables, layer, h)
            if layer == self.num_layers - 1:
                yield logits
                return
            rows = yield logits
            if rows is not None:
                h = _take(h, jnp.asarray(rows))

    def final_logits(self, batch: dict) -> np.ndarray:
        """The last exit's logits `[B, C]` from the dense network compiled as one function (the speed baseline)."""
        return np.asarray(_dense(self.config, self.variables, jnp.asarray(batch["images"])))

    def ramp_logits(self, batch: dict) -> np.ndarray:
        """Every exit's logits `[L, B, C]` from the whole network in one call."""
        return np.asarray(_whole(self.config, self.variables, jnp.asarray(batch["images"])))

    def device_exits(self, batch: dict, policy: Policy):
        """The exit loop on the device: (exit_layer [B], logits [B, C]) as device arrays."""
        return _device_exits(self.config, self.variables, jnp.asarray(batch["images"]), policy)


@jax.jit
def _take(h, rows):  # one compile per number of rows kept
    return jnp.take(h, rows, axis=0)


@functools.partial(jax.jit, static_argnums=0)
def _whole(cfg: ResNetConfig, variables: Variables, pictures):
    return resnet.MultiExitResNet(cfg).apply(variables, pictures, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _dense(cfg: ResNetConfig, variables: Variables, pictures):
    features = resnet.Backbone(cfg).apply({k: v["backbone"] for k, v in variables.items()},
                                          pictures, train=False)[-1]
    return resnet.Ramp(cfg).apply({"params": variables["params"]["ramps"][str(cfg.num_layers - 1)]}, features)


@functools.partial(jax.jit, static_argnums=0)
def _device_exits(cfg: ResNetConfig, variables: Variables, pictures, policy: Policy):
    """`device.exit_loop` over the blocks. A `lax.switch` branch must give one carry shape, and
    blocks change shape at each stage's first one, so the carry holds one slot per block output
    shape; block i reads block i-1's slot and writes its own."""
    h = resnet.stem(cfg, variables, pictures)
    shapes, out = [], h
    for layer in range(cfg.num_layers):
        out = jax.eval_shape(lambda x, layer=layer: resnet.block_step(cfg, variables, layer, x)[0], out)
        shapes.append((out.shape, out.dtype))
    slots = list(dict.fromkeys(shapes))
    slot = [slots.index(s) for s in shapes]
    h, z = resnet.block_step(cfg, variables, 0, h)
    carry = tuple(h if i == slot[0] else jnp.zeros(shape, dtype) for i, (shape, dtype) in enumerate(slots))

    def branch(layer):  # 0-based block >= 1
        def run(carry):
            h, z = resnet.block_step(cfg, variables, layer, carry[slot[layer - 1]])
            return carry[:slot[layer]] + (h,) + carry[slot[layer] + 1:], z
        return run

    return device.exit_loop(policy, (carry, z), [branch(layer) for layer in range(1, cfg.num_layers)])
