"""Early exit on a multi-exit ResNet (PCEE-BERT section 4.6.4): the text model's policies and runners
on images, unchanged.

`VisionExitModel` gives a trained `train/train_vision.py` run the interface the runners use on an
`EarlyExitModel`: `ramp_steps(batch)` (the stem, then one block and its exit per step; `send(rows)`
keeps only those rows for the blocks that follow), `final_logits(batch)` (the dense network, one
compiled function, the last exit only), `num_layers` and `config.num_labels`. A batch is
`{"images": float32 [B, H, W, 3]}`, normalised as the run was trained (`prepare`). The block
step is compiled once per block structure and input shape (`resnet.block_step`: 5 programs for
ResNet-56's 27 blocks), not once per block.

Modes, as for text (`jaxexit.exits.runners`), all giving the same exits as `jaxexit.exits.offline` on
`cached_logits`:
* `run_latency`: one image at a time, the host reading each exit's logits and deciding before
  the next block is dispatched (`runners.exit_one(..., pipelined=False)`);
* `run_batched`: images that exit leave the batch (`runners.exit_batch`, row buckets);
* `run_on_device`: the whole loop in one jitted function, each block under a `lax.cond` that skips
  it once every row of the batch has exited (the blocks change shape between stages, so one
  `lax.while_loop` carry cannot hold them);
* `cached_logits`: every exit's logits `[L, N, C]` through the same block steps.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxexit.vision import images, resnet
from jaxexit.exits import policies, runners
from jaxexit.training.checkpoint import read_json
from jaxexit.exits.policies import Policy
from jaxexit.vision.resnet import ResNetConfig, Variables
from jaxexit.exits.runners import Exits


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
    L = cfg.num_layers
    size = pictures.shape[0]
    h = resnet.stem(cfg, variables, pictures)
    state = policies.init_state(policy, size, jnp)
    exit_layer = jnp.zeros(size, jnp.int32)
    chosen = jnp.zeros((size, cfg.num_labels), jnp.float32)
    for layer in range(L):  # unrolled: a block changes the carry's shape at every stage's first block
        after = jax.eval_shape(lambda h, layer=layer: resnet.block_step(cfg, variables, layer, h)[0], h)

        def run(operands, layer=layer):
            h, state, exit_layer, chosen = operands
            h, z = resnet.block_step(cfg, variables, layer, h)
            return (h, *policies.device_decide(policy, L, jnp.int32(layer + 1), z, state, exit_layer, chosen))

        def skip(operands, after=after):  # every row has exited: the block is not computed
            _, state, exit_layer, chosen = operands
            return jnp.zeros(after.shape, after.dtype), state, exit_layer, chosen

        h, state, exit_layer, chosen = jax.lax.cond(jnp.all(exit_layer > 0), skip, run,
                                                    (h, state, exit_layer, chosen))
    return exit_layer, chosen


# ---- runners over uint8 images [N, H, W, 3] -------------------------------------------------------------
def singles(model: VisionExitModel, pictures: np.ndarray) -> list[dict]:
    """Every image as its own batch of one (the latency runners' inputs)."""
    return [model.prepare(pictures[i:i + 1]) for i in range(len(pictures))]


def chunks(model: VisionExitModel, pictures: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, dict]]:
    """`(rows, batch)` of `batch_size` images in order, the last one filled up by repeating its first image."""
    return [(rows, model.prepare(pictures[filled])) for rows, filled in runners.chunk_indices(len(pictures), batch_size)]


def run_latency(model: VisionExitModel, policy: Policy, pictures: np.ndarray, warmup: int = 2) -> Exits:
    return runners.latency(model, policy, singles(model, pictures), warmup, pipelined=False)


def run_full_latency(model: VisionExitModel, pictures: np.ndarray, warmup: int = 2) -> tuple[np.ndarray, float]:
    return runners.full_latency(model, singles(model, pictures), warmup)


def run_batched(model: VisionExitModel, policy: Policy, pictures: np.ndarray, batch_size: int = 64,
                warmup: int = 1) -> Exits:
    return runners.batched(model, policy, chunks(model, pictures, batch_size), len(pictures), batch_size, warmup)


def run_full_batched(model: VisionExitModel, pictures: np.ndarray, batch_size: int = 64, warmup: int = 1):
    return runners.full_batched(model, chunks(model, pictures, batch_size), len(pictures), warmup)


def run_on_device(model: VisionExitModel, policy: Policy, pictures: np.ndarray, batch_size: int = 1,
                  warmup: int = 1) -> Exits:
    return runners.on_device(model, policy, chunks(model, pictures, batch_size), len(pictures), warmup)


def cached_logits(model: VisionExitModel, pictures: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Every exit's logits `[L, N, C]` through the block steps the live runners use."""
    return runners.all_outputs(model, chunks(model, pictures, min(batch_size, max(len(pictures), 1))), len(pictures))
