"""Multi-exit ResNet for CIFAR (PCEE-BERT section 4.6.4): ResNet-56 with an exit after every block.

The network is He et al.'s CIFAR ResNet ("Deep Residual Learning", section 4.2): a 3x3
convolution with 16 filters + BatchNorm + ReLU, then three stages of n BasicBlocks (two 3x3
convolutions, each with BatchNorm; 16, 32, 64 channels; depth = 6n + 2, so ResNet-56 has n = 9
and 27 blocks). The first block of stages 2 and 3 halves the resolution with stride 2, and its
shortcut is the paper's option A: the input subsampled by 2 and zero-padded with the new channels,
which has no parameters (the 0.85M-parameter ResNet-56 of the paper and of the common PyTorch
reimplementations). Every block is followed by an exit (ramp): global average pooling -> Dense,
27 exits, the image counterpart of BERT's layer/ramp pairs; `__call__` returns logits `[L, B, C]`
that the policies, offline simulation and analyses take unchanged.

Variables are `{"params": ..., "batch_stats": ...}` (BatchNorm's running statistics), with the
backbone and the exits apart as in the text model (keys are 0-based block numbers):

    params:      {"backbone": {"stem": {"conv", "bn"}, "layer": {"0": {"conv1", "bn1", "conv2", "bn2"}, ...}},
                  "ramps":    {"0": {"classifier": {"kernel", "bias"}}, ...}}
    batch_stats: {"backbone": {"stem": {"bn"}, "layer": {"0": {"bn1", "bn2"}, ...}}}

`train=True` normalises with the batch's statistics and updates the running ones (apply with
`mutable=["batch_stats"]`); `train=False` uses the running statistics, so an image's logits do not
depend on the rest of its batch. Early-exit inference runs piecewise in eval mode: `stem` once,
then `block_step` for blocks 0, 1, ... until the policy exits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxexit.training.configs import DictConfig

Variables = dict[str, Any]

# He et al.'s initialisation, as torch.nn.init.kaiming_normal_ (fan-in, untruncated normal).
_KAIMING = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class ResNetConfig(DictConfig):
    """Shape and numerics of a multi-exit CIFAR ResNet (hashable: jit takes it as a static argument)."""

    depth: int = 56                           # 2 * blocks_per_stage * stages + 2 (6n + 2 with 3 stages)
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)    # channels of the stem and stage 1, then of each stage
    bn_momentum: float = 0.9                  # running = momentum * running + (1 - momentum) * batch
    bn_epsilon: float = 1e-5
    dtype: str = "float32"                    # computation dtype; parameters and logits stay float32
    conv_kernel_grad: str = "auto"            # "taps" (conv3x3's), "xla", or "auto": taps on CPU, else xla

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))  # a JSON list -> tuple
        stages = len(self.widths)
        if stages < 1 or min(self.widths) < 1:
            raise ValueError(f"widths must be one or more positive channel counts, got {self.widths}")
        if list(self.widths) != sorted(self.widths):
            raise ValueError(f"widths must not decrease, got {self.widths}: the option-A shortcut of a stage's "
                             "first block zero-pads the new channels and cannot drop any")
        if self.depth < 2 * stages + 2 or (self.depth - 2) % (2 * stages):
            raise ValueError(f"depth {self.depth} is not {2 * stages}n + 2 for a whole n >= 1 "
                             f"({stages} stages of n blocks of 2 convolutions, plus the stem and the exit); "
                             f"e.g. {', '.join(str(2 * stages * n + 2) for n in (1, 3, 5, 9))}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.conv_kernel_grad not in ("auto", "taps", "xla"):
            raise ValueError(f"conv_kernel_grad must be auto, taps or xla, got {self.conv_kernel_grad!r}")

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // (2 * len(self.widths))

    @property
    def num_layers(self) -> int:
        """Blocks, hence exits: 27 for ResNet-56."""
        return self.blocks_per_stage * len(self.widths)


class BlockSpec(NamedTuple):
    """What a block's computation depends on besides its parameters' values. Blocks with equal
    specs (and equal input shapes) share one compiled `block_step` program."""

    in_features: int
    features: int
    stride: int


def block_specs(cfg: ResNetConfig) -> tuple[BlockSpec, ...]:
    """The spec of every block, 0-based: stage s's first block takes the previous stage's width and,
    for s > 0, has stride 2."""
    specs, prev = [], cfg.widths[0]
    for stage, width in enumerate(cfg.widths):
        for i in range(cfg.blocks_per_stage):
            specs.append(BlockSpec(prev, width, 2 if stage > 0 and i == 0 else 1))
            prev = width
    return tuple(specs)


def num_block_programs(cfg: ResNetConfig) -> int:
    """Distinct programs `block_step` compiles for one input size: one per distinct block spec.
    For ResNet-56 that is 5 (stage 1; the first block of stage 2 and the other 8; the same for
    stage 3) for 27 blocks; 3 for depth 8 (one block per stage)."""
    return len(set(block_specs(cfg)))


def _slices(x: jax.Array, stride: int, out_h: int, out_w: int) -> list[jax.Array]:
    """The 9 windows of a 3x3, padding-1 convolution: `x` padded by one pixel, shifted by (i, j)
    for i, j in 0..2 (row-major, the HWIO kernel's order) and strided, each `[B, out_h, out_w, C]`."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows, cols = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    return [padded[:, i:i + rows:stride, j:j + cols:stride, :] for i in range(3) for j in range(3)]


def _lax_conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """3x3 convolution, padding 1, NHWC x HWIO: XLA's own forward and input gradient, and a kernel
    gradient computed as 9 batched matrix products, one per kernel tap,
    `dK[i, j] = sum_b window_ij(x)[b]^T @ dy[b]`.

    Why: on CPU, XLA lowers the kernel gradient to one convolution with a 32x32 "kernel", which
    is slow at CIFAR's small channel counts (measured on 2 cores, batch 128, 32x32x16: 195-250 ms
    against 85 ms this way; a whole ResNet-56 training step 8.2 s against 4.6 s, results/resnet_step.md). Equal to
    `lax.conv_general_dilated`'s gradient up to float32 summation order (tests/test_vision.py).
    """
    return _lax_conv3x3(x, kernel, stride)


def _conv3x3_fwd(x, kernel, stride):
    return _lax_conv3x3(x, kernel, stride), (x, kernel)


def _conv3x3_bwd(stride, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _lax_conv3x3(x, kernel, stride), x)
    (dx,) = input_vjp(dy)
    taps = [jnp.einsum("bhwc,bhwo->bco", window, dy, preferred_element_type=jnp.float32).sum(0)
            for window in _slices(x, stride, dy.shape[1], dy.shape[2])]
    dkernel = jnp.stack(taps).reshape(kernel.shape)
    return dx, dkernel.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(nn.Module):
    """A bias-free 3x3 convolution with padding 1: nn.Conv's variables (`kernel` `[3, 3, in, out]`,
    He initialisation) and numbers, through `conv3x3` where its kernel gradient is the faster one
    (`kernel_grad` "auto": on CPU; elsewhere XLA's own convolution gradient, e.g. cuDNN's)."""

    features: int
    stride: int
    dtype: str = "float32"
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _KAIMING, (3, 3, x.shape[-1], self.features), jnp.float32)
        dtype = jnp.dtype(self.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if self.kernel_grad == "taps" or (self.kernel_grad == "auto" and jax.default_backend() == "cpu"):
            return conv3x3(x, kernel, self.stride)
        return _lax_conv3x3(x, kernel, self.stride)


def _conv(cfg: ResNetConfig, features: int, stride: int, name: str) -> Conv3x3:
    return Conv3x3(features, stride, cfg.dtype, cfg.conv_kernel_grad, name=name)


def _batch_norm(cfg: ResNetConfig, train: bool, name: str) -> nn.BatchNorm:
    # Two-pass variance (use_fast_variance=False): E[x^2] - E[x]^2 loses digits in float32.
    return nn.BatchNorm(use_running_average=not train, momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon,
                        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, use_fast_variance=False, name=name)


class Stem(nn.Module):
    """conv3x3(widths[0]) -> BatchNorm -> ReLU on normalised images `[B, H, W, 3]`."""

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = _conv(self.cfg, self.cfg.widths[0], 1, "conv")(images.astype(jnp.dtype(self.cfg.dtype)))
        return nn.relu(_batch_norm(self.cfg, train, "bn")(x))


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), with the option-A shortcut: the
    identity, or for a block that changes the shape, `x[:, ::stride, ::stride]` zero-padded with
    the new channels (half before, half after the old ones, as the common PyTorch version)."""

    cfg: ResNetConfig
    spec: BlockSpec

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, spec = self.cfg, self.spec
        y = nn.relu(_batch_norm(cfg, train, "bn1")(_conv(cfg, spec.features, spec.stride, "conv1")(x)))
        y = _batch_norm(cfg, train, "bn2")(_conv(cfg, spec.features, 1, "conv2")(y))
        shortcut = x[:, ::spec.stride, ::spec.stride, :]
        extra = spec.features - spec.in_features
        if extra:
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(y + shortcut)


class Ramp(nn.Module):
    """An exit: global average pooling of a block's output `[B, H, W, C]` -> Dense -> logits `[B, classes]`
    in float32."""

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, features):
        pooled = features.astype(jnp.float32).mean(axis=(1, 2))
        return nn.Dense(self.cfg.num_classes, kernel_init=_KAIMING, param_dtype=jnp.float32,
                        name="classifier")(pooled)


class _BlockStack(nn.Module):
    """Holds the blocks' variables under keys "0", "1", ..."""

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, layer: int, x, train: bool = False):
        # Flax keeps a submodule's variables under its name across calls of a compact method.
        return BasicBlock(self.cfg, block_specs(self.cfg)[layer], name=str(layer))(x, train)


class Backbone(nn.Module):
    """Stem + blocks. Returns every block's output, a list of L arrays `[B, H_i, W_i, C_i]`."""

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, images, train: bool = False) -> list[jax.Array]:
        h = Stem(self.cfg, name="stem")(images, train)
        blocks = _BlockStack(self.cfg, name="layer")
        outputs = []
        for layer in range(self.cfg.num_layers):
            h = blocks(layer, h, train)
            outputs.append(h)
        return outputs


class Ramps(nn.Module):
    """Exit i on block i's output, for every block: logits `[L, B, C]`."""

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, features: list[jax.Array]):
        return jnp.stack([Ramp(self.cfg, name=str(i))(f) for i, f in enumerate(features)])


class MultiExitResNet(nn.Module):
    """Backbone + an exit after every block. `__call__(images, train)` returns logits `[L, B, C]`.

    With `train=True`, apply with `mutable=["batch_stats"]`: it returns `(logits, {"batch_stats": new})`.
    """

    cfg: ResNetConfig

    def setup(self):
        self.backbone = Backbone(self.cfg)
        self.ramps = Ramps(self.cfg)

    def __call__(self, images, train: bool = False):
        return self.ramps(self.backbone(images, train))


def init_variables(cfg: ResNetConfig, rng: jax.Array, image_size: int | tuple[int, int] = 32) -> Variables:
    """Freshly initialised `{"params", "batch_stats"}` for images of `image_size` pixels (square,
    or `(height, width)`). Use under `jax.eval_shape` for the shapes alone."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return dict(MultiExitResNet(cfg).init(rng, jnp.zeros((1, height, width, 3), jnp.float32), train=False))


# ---- piecewise (eval mode) ----------------------------------------------------------------------
def block_variables(variables: Variables, layer: int) -> Variables:
    """Block `layer`'s (0-based) own variables and its exit's parameters, as `block_step` takes them:
    `{"block": {"params", "batch_stats"}, "ramp": {"params"}}`."""
    key = str(layer)
    return {
        "block": {"params": variables["params"]["backbone"]["layer"][key],
                  "batch_stats": variables["batch_stats"]["backbone"]["layer"][key]},
        "ramp": {"params": variables["params"]["ramps"][key]},
    }


def stem(cfg: ResNetConfig, variables: Variables, images: jax.Array) -> jax.Array:
    """The stem in eval mode: normalised images `[B, H, W, 3]` -> block 0's input `[B, H, W, widths[0]]`."""
    stem_vars = {"params": variables["params"]["backbone"]["stem"],
                 "batch_stats": variables["batch_stats"]["backbone"]["stem"]}
    return _stem_program(cfg, stem_vars, images)


def block_step(cfg: ResNetConfig, variables: Variables, layer: int, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Block `layer` (0-based) and its exit in eval mode: returns `(h, logits [B, C])`.

    The block's variables are passed to one jitted program as arguments and only its `BlockSpec`
    is static, so the programs are compiled once per distinct block structure and input shape,
    not once per block: `num_block_programs(cfg)` of them (5 for ResNet-56's 27 blocks). Inside
    a caller's `jax.jit` the program is traced inline. `stem` then `block_step` for every layer
    equals `__call__(train=False)`.
    """
    if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"block {layer} is outside 0..{cfg.num_layers - 1} (the model has {cfg.num_layers} blocks)")
    return _block_program(cfg, block_specs(cfg)[layer], block_variables(variables, layer), h)


@functools.partial(jax.jit, static_argnums=0)
def _stem_program(cfg: ResNetConfig, stem_vars: Variables, images: jax.Array) -> jax.Array:
    return Stem(cfg).apply(stem_vars, images, train=False)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block_program(cfg: ResNetConfig, spec: BlockSpec, block_vars: Variables, h: jax.Array):
    h = BasicBlock(cfg, spec).apply(block_vars["block"], h, train=False)
    return h, Ramp(cfg).apply(block_vars["ramp"], h)
