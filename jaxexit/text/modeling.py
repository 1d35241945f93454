"""Flax modules of the multi-exit encoder.

Parameter names mirror Hugging Face's BERT (`embeddings/LayerNorm/scale`,
`layer/0/attention/self/query/kernel`, ...). The parameter pytree is

    {"backbone": {"embeddings": {...}, "layer": {"0": {...}, ...}},
     "ramps":    {"0": {"pooler": {"dense": ...}, "classifier": ...}, ...}}     # per_ramp
     "ramps":    {"pooler": {"dense": ...}, "0": {"classifier": ...}, ...}}     # shared
     "lte":      {"dense": {"kernel": [H, 1], "bias": [1]}}                     # with cfg.lte only

Keys are 0-based like Hugging Face's (`ramps/"0"` is ramp 1 of docs/architecture.md). ALBERT's backbone
holds `num_hidden_groups` layer entries that the L layers share.

The encoder runs whole (`MultiExitEncoder.__call__`) or piecewise for early exit
(`jaxexit.text.exit_steps`: one layer and its ramp per step, with their parameters passed in, from
`layer_params` and `ramp_params`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxexit.text.config import EncoderConfig

Params = dict


_ACT = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # exact erf GELU, as BERT
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


class Dense(nn.Module):
    """nn.Dense's variables (`kernel` `[in, out]`, `bias`) and numbers, which also computes with the
    kernel stored transposed, as `kernel_t` `[out, in]` (`transpose_kernels`; PyTorch's Linear layout).

    Why: on CPU, XLA's product of a few rows by a kernel is faster when the kernel's rows are the
    output features (both operands then contract along contiguous memory; measured in
    results/scale_speed_base.md). Training and checkpoints keep `kernel`; `EarlyExitModel` switches
    to `kernel_t` for inference (`step_params`).
    """

    features: int
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        if self.has_variable("params", "kernel_t"):
            kernel = self.get_variable("params", "kernel_t").astype(self.dtype)
            y = lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())))
        else:
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
            y = lax.dot_general(x, kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return y + bias.astype(self.dtype)


def transpose_kernels(params: Params) -> Params:
    """`params` with every dense kernel `[in, out]` replaced by its transpose stored contiguously,
    under `kernel_t` (see `Dense`); every other leaf is the same array. Idempotent."""
    if not isinstance(params, dict):
        return params
    out = {k: transpose_kernels(v) for k, v in params.items() if k != "kernel"}
    if "kernel" in params:
        out["kernel_t"] = jnp.asarray(np.ascontiguousarray(np.asarray(params["kernel"]).T))
    return out


def untranspose_kernels(params: Params) -> Params:
    """The inverse of `transpose_kernels`: every `kernel_t` back to `kernel` `[in, out]`, exactly."""
    if not isinstance(params, dict):
        return params
    out = {k: untranspose_kernels(v) for k, v in params.items() if k != "kernel_t"}
    if "kernel_t" in params:
        out["kernel"] = jnp.asarray(np.ascontiguousarray(np.asarray(params["kernel_t"]).T))
    return out


def _dense(cfg: EncoderConfig, features: int, name: str) -> Dense:
    return Dense(features, dtype=jnp.dtype(cfg.dtype), kernel_init=nn.initializers.normal(cfg.initializer_range),
                 name=name)


def _layer_norm(cfg: EncoderConfig, name: str = "LayerNorm") -> nn.LayerNorm:
    # Two-pass variance, like torch.nn.LayerNorm (the fast E[x^2]-E[x]^2 form loses digits).
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, name=name, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
        use_fast_variance=False,
    )


def attention_bias(attention_mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Additive mask `[B, 1, 1, T]`: 0 where attended, the dtype's minimum where padded."""
    mask = attention_mask[:, None, None, :].astype(dtype)
    return (1.0 - mask) * jnp.finfo(dtype).min


def ramp_input(cfg: EncoderConfig, hidden: jax.Array, bias: jax.Array) -> jax.Array:
    """What a ramp reads of a layer's states `hidden [..., B, T, H]` (any leading axes): `[..., B, H]`.

    `cls`: the first token's state (the papers). `mean`: the mean of the token states over the
    attention mask, the natural input for checkpoints trained with mean pooling (sentence-embedding
    models), whose first token barely varies in early layers. `bias` is `attention_bias`'s
    `[B, 1, 1, T]` (0 where attended), which every step carries anyway.
    """
    if cfg.ramp_input == "cls":
        return hidden[..., 0, :]
    mask = (bias[:, 0, 0, :] == 0).astype(hidden.dtype)[:, :, None]  # [B, T, 1]
    return (hidden * mask).sum(-2) / mask.sum(-2)


def position_ids(cfg: EncoderConfig, input_ids: jax.Array) -> jax.Array:
    """BERT/ALBERT: 0..T-1. RoBERTa: padding_idx + 1 + rank among non-pad tokens; pads get padding_idx."""
    if cfg.arch == "roberta":
        not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


class Embeddings(nn.Module):
    """Word + token-type + position embeddings -> LayerNorm -> dropout (-> ALBERT's projection)."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool = True):
        cfg = self.cfg
        width = cfg.embedding_width
        init = nn.initializers.normal(cfg.initializer_range)
        dtype = jnp.dtype(cfg.dtype)

        def embed(num, name):
            return nn.Embed(num, width, name=name, embedding_init=init, dtype=dtype, param_dtype=jnp.float32)

        x = embed(cfg.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids(cfg, input_ids))
        x = _layer_norm(cfg)(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        if cfg.arch == "albert":
            x = _dense(cfg, cfg.hidden_size, "embedding_hidden_mapping_in")(x)
        return x


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention (`attention/self` in BERT).

    Returns `(context, (keys, values))`. `queries` (rows of `h`, default all of them) are the
    positions that attend; `kv`, when given, are `h`'s keys and values computed before (the
    early-exit steps compute them once for the first token and reuse them for the rest).
    """

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, h, bias, deterministic: bool = True, queries=None, kv=None):
        cfg = self.cfg
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        split = lambda x: x.reshape(x.shape[:-1] + (heads, head_dim))  # noqa: E731
        q = split(_dense(cfg, cfg.hidden_size, "query")(h if queries is None else queries))
        if kv is None:
            kv = (split(_dense(cfg, cfg.hidden_size, "key")(h)), split(_dense(cfg, cfg.hidden_size, "value")(h)))
        k, v = kv
        if deterministic or cfg.attention_probs_dropout_prob == 0:
            # XLA's fused attention (same math, scale 1/sqrt(d)); about 30% faster on CPU.
            mask_value = jnp.finfo(q.dtype).min  # the f32 minimum would overflow float16 to -inf
            context = jax.nn.dot_product_attention(q, k, v, bias=jnp.where(bias < 0, mask_value, 0).astype(q.dtype))
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (head_dim**-0.5)
            probs = jax.nn.softmax(scores + bias, axis=-1)
            probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
            context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        return context.reshape(context.shape[:-2] + (cfg.hidden_size,)), kv


class ResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's `attention/output` and `output`."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x, residual, deterministic: bool = True):
        x = _dense(self.cfg, self.cfg.hidden_size, "dense")(x)
        x = nn.Dropout(self.cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return _layer_norm(self.cfg)(x + residual)


class Attention(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, h, bias, deterministic: bool = True, queries=None, kv=None):
        context, kv = SelfAttention(self.cfg, name="self")(h, bias, deterministic, queries, kv)
        residual = h if queries is None else queries
        return ResidualOutput(self.cfg, name="output")(context, residual, deterministic), kv


class FeedForward(nn.Module):
    """`intermediate` (dense + activation): the first half of BERT's feed-forward block."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x):
        return _ACT[self.cfg.hidden_act](_dense(self.cfg, self.cfg.intermediate_size, "dense")(x))


class Layer(nn.Module):
    """One post-LayerNorm transformer layer.

    `queries` / `kv` as in `SelfAttention`: with `queries`, the layer's output at those rows only;
    `return_kv` also returns the keys and values of `h` that the layer used.
    """

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, h, bias, deterministic: bool = True, queries=None, kv=None, return_kv: bool = False):
        a, kv = Attention(self.cfg, name="attention")(h, bias, deterministic, queries, kv)
        i = FeedForward(self.cfg, name="intermediate")(a)
        out = ResidualOutput(self.cfg, name="output")(i, a, deterministic)
        return (out, kv) if return_kv else out


class Pooler(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, features):
        return jnp.tanh(_dense(self.cfg, self.cfg.hidden_size, "dense")(features))


class Ramp(nn.Module):
    """Off-ramp: pooler (dense + tanh) on the ramp input (`ramp_input`) -> dropout -> classifier.
    Logits in fp32."""

    cfg: EncoderConfig
    pooler: nn.Module | None = None  # a shared Pooler owned elsewhere (PABEE/PCEE), else its own

    @nn.compact
    def __call__(self, features, deterministic: bool = True, return_pooled: bool = False):
        pooler = self.pooler if self.pooler is not None else Pooler(self.cfg, name="pooler")
        pooled = pooler(features)
        x = nn.Dropout(self.cfg.ramp_dropout)(pooled, deterministic=deterministic)
        logits = _dense(self.cfg, self.cfg.num_labels, "classifier")(x).astype(jnp.float32)
        return (logits, pooled) if return_pooled else logits


class LearnedExit(nn.Module):
    """BERxiT's learning-to-exit module: one dense unit on a ramp's pooled output, shared by every
    layer. Returns the pre-sigmoid output `[...]` in float32; sigmoid of it predicts the ramp's error."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, pooled):
        return _dense(self.cfg, 1, "dense")(pooled)[..., 0].astype(jnp.float32)


class Backbone(nn.Module):
    """Embeddings + L layers. Returns every hidden state `[L+1, B, T, H]` (embedding output first)."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True,
                 num_layers: int | None = None):
        """`num_layers` < L runs only the first layers (stage 2 of DeeBERT never needs layer L)."""
        cfg = self.cfg
        h = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
        bias = attention_bias(attention_mask)
        layers = _LayerStack(cfg, name="layer")
        states = [h]
        for i in range(cfg.num_hidden_layers if num_layers is None else num_layers):
            h = layers(i, h, bias, deterministic)
            states.append(h)
        return jnp.stack(states)


class _LayerStack(nn.Module):
    """Holds the layer parameter sets under keys "0", "1", ... (ALBERT: one per group)."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, layer: int, h, bias, deterministic: bool = True):
        # Flax shares a submodule's parameters when a compact method re-creates it by name.
        index = self.cfg.layer_param_index(layer)
        return Layer(self.cfg, name=str(index))(h, bias, deterministic)


class Ramps(nn.Module):
    """Ramps 1..K applied to their inputs `[K, B, H]` (`ramp_input` of layers 1..K, K <= L);
    returns logits `[K, B, C]`."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, features, deterministic: bool = True, return_pooled: bool = False):
        """Logits `[K, B, C]`; with `return_pooled`, also each ramp's pooled output `[K, B, H]`."""
        shared = Pooler(self.cfg, name="pooler") if self.cfg.ramp_pooler == "shared" else None
        outs = [Ramp(self.cfg, pooler=shared, name=str(i))(features[i], deterministic, return_pooled=True)
                for i in range(features.shape[0])]
        logits = jnp.stack([o[0] for o in outs])
        return (logits, jnp.stack([o[1] for o in outs])) if return_pooled else logits


class MultiExitEncoder(nn.Module):
    """Backbone + one ramp per layer. `__call__` returns `(logits [L, B, C], hidden or None)`.

    Dropout is active only when `deterministic=False`, with an rng passed as `rngs={"dropout": key}`.
    """

    cfg: EncoderConfig

    def setup(self):
        self.backbone = Backbone(self.cfg)
        self.ramps = Ramps(self.cfg)
        if self.cfg.lte:
            self.lte = LearnedExit(self.cfg)

    def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True,
                 output_hidden_states: bool = False):
        hidden = self.encode(input_ids, token_type_ids, attention_mask, deterministic)
        logits = self.classify(ramp_input(self.cfg, hidden[1:], attention_bias(attention_mask)), deterministic)
        if self.cfg.lte and self.is_initializing():  # create its parameters (`exit_steps.ramp_output` and stage 4 run it)
            self.lte(jnp.zeros((1, self.cfg.hidden_size), jnp.float32))
        return logits, (hidden if output_hidden_states else None)

    def encode(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True,
               num_layers: int | None = None):
        return self.backbone(input_ids, token_type_ids, attention_mask, deterministic, num_layers)

    def classify(self, features, deterministic: bool = True):
        """Ramps on their inputs `[K, B, H]` (`ramp_input` of layers 1..K)."""
        return self.ramps(features, deterministic)


# ---- parameters of one layer or ramp (the piecewise steps: `jaxexit.text.exit_steps`) ----------------
def layer_params(cfg: EncoderConfig, params: Params, layer: int) -> Params:
    """Parameters of 0-based layer `layer` (ALBERT: the shared set it uses)."""
    return params["backbone"]["layer"][str(cfg.layer_param_index(layer))]


def ramp_params(cfg: EncoderConfig, params: Params, layer: int) -> Params:
    """Parameters of the ramp after 0-based layer `layer`, as `{"pooler", "classifier"}`, plus the
    shared `"lte"` on a model with a learning-to-exit module."""
    ramps = params["ramps"]
    own = ramps[str(layer)]
    pooler = ramps["pooler"] if cfg.ramp_pooler == "shared" else own["pooler"]
    out = {"pooler": pooler, "classifier": own["classifier"]}
    if cfg.lte:
        out["lte"] = params["lte"]
    return out
