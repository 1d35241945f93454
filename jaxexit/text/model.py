"""`EarlyExitModel`: the multi-exit encoder with its parameters and tokenizer, ready to run."""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax import lax

from jaxexit.text import hf_import, modeling
from jaxexit.exits import policies
from jaxexit.text.config import EncoderConfig
from jaxexit.exits.policies import Policy
from jaxexit.text.tokenization import Tokenizer

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


@functools.partial(jax.jit, static_argnames=("cfg", "output_hidden_states"))
def _whole(cfg: EncoderConfig, params, batch, output_hidden_states: bool = False):
    return modeling.MultiExitEncoder(cfg).apply(
        {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
        output_hidden_states=output_hidden_states,
    )


@jax.jit
def _take_rows(tree, rows):  # one compile per number of rows kept
    return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), tree)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _final(cfg: EncoderConfig, params, batch):
    """The dense model without exits: every layer, then ramp L only (the speed baseline). Layer by
    layer rather than through the encoder module, whose stacking of every layer's states made the
    baseline ~9% slower (MiniLM, batch 1, 32 tokens: 7.7 against 7.0 ms) and early exit look better."""
    hidden, bias = modeling.embed(cfg, params, batch)
    for i in range(cfg.num_hidden_layers):
        hidden = modeling.Layer(cfg).apply({"params": modeling.layer_params(cfg, params, i)}, hidden, bias)
    features = modeling.ramp_input(cfg, hidden, bias)
    ramp = modeling.ramp_params(cfg, params, cfg.num_hidden_layers - 1)
    return modeling.Ramp(cfg).apply({"params": {"pooler": ramp["pooler"], "classifier": ramp["classifier"]}}, features)


def init_ramps(cfg: EncoderConfig, rng: jax.Array, pooler: dict | None = None) -> dict:
    """Fresh ramps (classifier N(0, initializer_range), zero bias, like BERT's init).

    With `pooler` (the checkpoint's pretrained pooler), every ramp's own pooler (DeeBERT), or
    the shared one (PABEE/PCEE), starts as a copy of it.
    """
    features = jnp.zeros((cfg.num_hidden_layers, 1, cfg.hidden_size), jnp.float32)
    ramps = modeling.MultiExitEncoder(cfg).init(rng, features, method="classify")["params"]["ramps"]
    ramps = jax.tree_util.tree_map(np.asarray, ramps)
    if pooler is not None:
        if cfg.ramp_pooler == "shared":
            ramps["pooler"] = _copy(pooler)
        else:
            for i in range(cfg.num_hidden_layers):
                ramps[str(i)]["pooler"] = _copy(pooler)
    return ramps


def init_lte(cfg: EncoderConfig, rng: jax.Array) -> dict:
    """A fresh learning-to-exit module (dense kernel N(0, initializer_range), zero bias)."""
    pooled = jnp.zeros((1, cfg.hidden_size), jnp.float32)
    return jax.tree_util.tree_map(np.asarray, modeling.LearnedExit(cfg).init(rng, pooled)["params"])


def _copy(tree):
    return jax.tree_util.tree_map(np.array, tree)


class EarlyExitModel:
    """A multi-exit encoder: config, parameters (`{"backbone", "ramps"}`) and tokenizer.

    Whole-model calls (`hidden_states`, `ramp_logits`) run in eval mode (no dropout). The
    piecewise steps (`embed_step`, `layer_step`; the early-exit runners' `first_exit_step`,
    `exit_step` and `ramp_steps`) are jitted once per model and reused for every layer.
    """

    # Batches of at least this many tokens (rows x length) take the first-token exit steps in
    # `ramp_steps`. Measured on a 2-core CPU with MiniLM (results/exit_steps.md, every row exiting
    # at layer 4): 1.22x the plain steps' time at 1 x 16 and 1.07x at 1 x 64 (weight reads
    # dominate), 0.98x at 8 x 32, 0.90x at 16 x 32, 0.82x at 64 x 64, 0.79x at 128 x 64.
    first_token_steps_from = 512

    def __init__(self, config: EncoderConfig, params: dict, tokenizer: Tokenizer | None = None,
                 source: str | None = None):
        self.config = config
        self._params = jax.tree_util.tree_map(jnp.asarray, params)
        self._step_params = None
        self.tokenizer = tokenizer
        self.source = source
        self.embed_step = jax.jit(functools.partial(modeling.embed, config))
        self.layer_step = jax.jit(functools.partial(modeling.layer_ramp_step, config))
        self.first_exit_step = jax.jit(functools.partial(modeling.first_exit_step, config))
        self.exit_step = jax.jit(functools.partial(modeling.exit_step, config))
        # the pipelined latency path's steps (`runners.exit_one`): layer, ramp and the policy's step
        decided = dict(static_argnames=("first_token", "last"))
        self.decided_head_step = jax.jit(functools.partial(decided_head_step, config), **decided)
        self.decided_step = jax.jit(functools.partial(decided_step, config), **decided)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, num_labels: int = 2, *,
                        ramp_pooler: str = "per_ramp", ramp_input: str = "cls", max_length: int | None = None,
                        seed: int = 0, **config_overrides) -> "EarlyExitModel":
        """Load a Hugging Face checkpoint (local directory or hub id) and add fresh ramps.

        Reads `config.json`, the safetensors weights and the tokenizer files; no torch needed.
        `max_length` (tokens per input) defaults to 128, or fewer if the checkpoint has fewer positions.
        """
        directory = hf_import.resolve(name_or_path)
        config = EncoderConfig.from_hf_file(
            directory / "config.json", num_labels=num_labels, ramp_pooler=ramp_pooler, ramp_input=ramp_input,
            **config_overrides
        )
        limit = config.max_position_embeddings - (config.pad_token_id + 1 if config.arch == "roberta" else 0)
        if max_length is None:
            max_length = min(128, limit)
        elif max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds the {limit} positions this checkpoint has")
        files = hf_import.weight_files(directory)
        expected = jax.eval_shape(
            lambda: modeling.MultiExitEncoder(config).init(jax.random.PRNGKey(0), *_dummy_batch(), method="encode")
        )["params"]["backbone"]
        backbone, pooler = hf_import.load_backbone(config, files, expected)
        if pooler is None:
            log.info("%s has no pooler: ramp poolers start from a fresh init", directory)
        ramps = init_ramps(config, jax.random.PRNGKey(seed), pooler)
        params = {"backbone": backbone, "ramps": ramps}
        if config.lte:
            params["lte"] = init_lte(config, jax.random.fold_in(jax.random.PRNGKey(seed), 1))
        tokenizer = None
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = Tokenizer.from_pretrained(directory, max_length=max_length)
        else:
            log.warning("%s has no tokenizer files: pass token ids to the model yourself", directory)
        return cls(config, params, tokenizer, source=str(name_or_path))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike) -> "EarlyExitModel":
        """A fine-tuned model from a `train/finetune.py` run directory (its final parameters)."""
        from jaxexit.training.checkpoint import RunDir

        run = RunDir(run_dir)
        if not run.path.is_dir():
            raise FileNotFoundError(f"checkpoint {run.path} does not exist")
        config = EncoderConfig.from_dict(run.encoder_config())
        abstract = jax.eval_shape(lambda: modeling.MultiExitEncoder(config).init(
            jax.random.PRNGKey(0), *_dummy_batch())["params"])
        params = run.load_params(abstract)
        tokenizer = Tokenizer.from_pretrained(run.path / "tokenizer", max_length=run.train_config()["max_length"])
        return cls(config, params, tokenizer, source=str(run.path))

    @classmethod
    def from_config(cls, config: EncoderConfig, seed: int = 0, tokenizer: Tokenizer | None = None):
        """A randomly initialised model (tests, tiny end-to-end runs)."""
        params = modeling.MultiExitEncoder(config).init(jax.random.PRNGKey(seed), *_dummy_batch())["params"]
        return cls(config, params, tokenizer)

    # ---- running -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def tokenize(self, texts, pairs=None, length: int | None = None) -> dict[str, np.ndarray]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids in a batch dict instead")
        return self.tokenizer(texts, pairs, length=length)

    def hidden_states(self, batch: dict) -> np.ndarray:
        """Every layer's hidden states `[L+1, B, T, H]`: the embedding output, then each layer."""
        _, hidden = _whole(self.config, self.step_params, self._check(batch), output_hidden_states=True)
        return np.asarray(hidden)

    def ramp_logits(self, batch: dict) -> np.ndarray:
        """Every ramp's logits `[L, B, C]` (ramp L is the model's final classifier)."""
        logits, _ = _whole(self.config, self.step_params, self._check(batch))
        return np.asarray(logits)

    def final_logits(self, batch: dict) -> np.ndarray:
        """Ramp L's logits `[B, C]` from the dense model compiled as one function (no exits)."""
        return np.asarray(_final(self.config, self.step_params, self._check(batch)))

    def ramp_steps(self, batch: dict):
        """Ramp 1..L logits `[B, C]` of `batch` one layer at a time: a generator, so layer i+1 is
        dispatched only when the caller asks for it. `send(rows)` (an index array) instead of
        `next` keeps only those rows of the batch for the layers that follow.

        Batches of at least `first_token_steps_from` tokens run the first-token steps
        (`modeling.first_exit_step` / `exit_step`: an input exiting at layer m pays m - 1 whole
        layers); smaller ones the plain per-layer step, because there the layer's cost is reading
        its weights, which the first-token steps do twice (`bench/exit_steps.py`)."""
        batch = self._check(batch)
        if self.first_token_steps(batch["input_ids"].shape):
            carry, bias, logits = self.first_exit_step(self.step_params, batch)
            step = lambda layer, carry, bias: self.exit_step(  # noqa: E731
                self.layer_params(layer - 1), self.layer_params(layer), self.ramp_params(layer), carry, bias)
        else:
            carry, bias = self.embed_step(self.step_params, batch)
            carry, logits = self.layer_step(self.layer_params(0), self.ramp_params(0), carry, bias)
            step = lambda layer, carry, bias: self.layer_step(  # noqa: E731
                self.layer_params(layer), self.ramp_params(layer), carry, bias)
        for layer in range(1, self.num_layers):
            rows = yield logits
            if rows is not None:
                carry, bias = _take_rows((carry, bias), rows)
            carry, logits = step(layer, carry, bias)
        yield logits

    def device_exits(self, batch: dict, policy: Policy):
        """The whole exit loop in one jitted `lax.while_loop`: `(exit_layer [B], outputs [B, C])`."""
        batch = self._check(batch)
        return device_exits(self.config, self.step_params, batch, policy,
                            first_token=self.first_token_steps(batch["input_ids"].shape))

    def inputs(self, split, rows) -> dict:
        """The padded batch of inputs `rows` of an `EncodedSplit` (the runners' `RampModel.inputs`)."""
        return self.tokenizer.pad([split.rows[i] for i in rows], [split.types[i] for i in rows])

    def first_token_steps(self, shape: tuple[int, int]) -> bool:
        """Whether a batch of `shape` (rows, length) runs the first-token exit steps (at least
        `first_token_steps_from` tokens, and ramps that read the first token) rather than the plain
        layer step, on host and device. Mean-pooled ramps read every token of their layer."""
        return self.config.ramp_input == "cls" and shape[0] * shape[1] >= self.first_token_steps_from

    @property
    def params(self) -> dict:
        """The parameters in the canonical layout (dense kernels `[in, out]`) that training,
        checkpoints and `optim` take. Once inference has run on the CPU the model keeps only its
        step layout (`step_params`), so that it holds each kernel once; from then on every call
        rebuilds the canonical tree (a copy of every kernel: take it once, not per use)."""
        if self._params is None:
            return modeling.untranspose_kernels(self._step_params)
        return self._params

    @property
    def step_params(self) -> dict:
        """What inference computes with: on CPU the dense kernels transposed (`modeling.Dense`), the
        rest shared with `params`; elsewhere `params` itself. Made on first use (a model only trained
        never holds it); on CPU it then replaces the canonical tree rather than doubling the kernels
        (BERT-base: 340 MB)."""
        if self._step_params is None:
            if jax.default_backend() == "cpu":
                self._step_params, self._params = modeling.transpose_kernels(self._params), None
            else:
                self._step_params = self._params
        return self._step_params

    def layer_params(self, layer: int) -> dict:
        return modeling.layer_params(self.config, self.step_params, layer)

    def ramp_params(self, layer: int) -> dict:
        return modeling.ramp_params(self.config, self.step_params, layer)

    def _check(self, batch: dict) -> dict:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; build it with model.tokenize(...)")
        shapes = {np.shape(batch[k]) for k in BATCH_KEYS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"batch arrays must share one [B, T] shape, got {[np.shape(batch[k]) for k in BATCH_KEYS]}")
        (_, length), = shapes
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings")
        return {k: _int32(batch[k]) for k in BATCH_KEYS}


def _int32(x):
    """`x` as int32 without a device op for host data: numpy stays numpy (a jitted call copies it
    in its own dispatch), a device array is converted only when its dtype differs. `jnp.asarray(x,
    jnp.int32)` on a host array costs a transfer and a conversion dispatch per key, ~0.2 ms each at
    batch 1 on the CPU: more than a MiniLM ramp."""
    if isinstance(x, jax.Array):
        return x if x.dtype == jnp.int32 else x.astype(jnp.int32)
    return np.asarray(x, np.int32)


# ---- steps that decide: layer, ramp and the policy's step in one call (`runners.exit_one`) ----------
def _decide(policy: Policy, num_layers: int, layer, z, state, chosen):
    """`policies.device_decide` for a batch none of whose rows has exited: (state, done, chosen),
    `done` once every row exits here."""
    exit_layer = jnp.zeros(chosen.shape[0], jnp.int32)
    state, exit_layer, chosen = policies.device_decide(policy, num_layers, layer, z, state, exit_layer, chosen)
    return state, jnp.all(exit_layer > 0), chosen


def decided_head_step(cfg, first_token: bool, last: bool, head, layers_p: tuple, ramps_p: tuple, batch,
                      policy: Policy):
    """Embeddings (`head`: `{"backbone": {"embeddings": ...}}`) and layers 1..m (m = `len(layers_p)`,
    at most `policies.earliest_exit(policy)`: no row can exit before layer m), with the policy's
    steps on the ramps its state reads (`ramps_p[i]`; None for a ramp nothing reads) and on ramp m:
    (carry, bias, state, done, chosen). One call instead of m: each call costs the CPU ~0.25 ms
    beyond its layer. `first_token`: layer m by the first-token exit steps
    (`modeling.first_exit_step`), the carry holding its input and keys/values; `last`: the plain
    steps' last layer, computed at the first token only (first-token ramps: nothing reads its other
    tokens, as in the dense model)."""
    L, m = cfg.num_hidden_layers, len(layers_p)
    hidden, bias = modeling.embed(cfg, head, batch)
    size = batch["input_ids"].shape[0]
    state = policies.init_state(policy, size, jnp)
    exit_layer, chosen = jnp.zeros(size, jnp.int32), jnp.zeros((size, cfg.num_labels), jnp.float32)
    for i in range(m - 1):
        if ramps_p[i] is None:
            hidden = modeling.Layer(cfg).apply({"params": layers_p[i]}, hidden, bias)
        else:
            hidden, z = modeling.layer_ramp_step(cfg, layers_p[i], ramps_p[i], hidden, bias)
            state, exit_layer, chosen = policies.device_decide(policy, L, i + 1, z, state, exit_layer, chosen)
    if first_token:
        kv, z = modeling.first_token_exit(cfg, layers_p[-1], ramps_p[-1], hidden, bias)
        carry = (hidden, kv)
    elif last:
        carry, z = hidden, modeling.first_token_exit(cfg, layers_p[-1], ramps_p[-1], hidden, bias)[1]
    else:
        carry, z = modeling.layer_ramp_step(cfg, layers_p[-1], ramps_p[-1], hidden, bias)
    state, exit_layer, chosen = policies.device_decide(policy, L, m, z, state, exit_layer, chosen)
    return carry, bias, state, jnp.all(exit_layer > 0), chosen


def decided_step(cfg, first_token: bool, last: bool, prev_p, layer_p, ramp_p, carry, bias, policy: Policy,
                 state, done, chosen, layer):
    """Layer `layer` (traced, 2..L), its ramp and the policy's step, or nothing once `done` (a
    device flag the host has not read yet): (carry, state, done, chosen). One compiled step
    serves every layer, plus one for `last` (see `decided_head_step`); `prev_p`: layer - 1's
    parameters, which the first-token steps finish."""
    def run(operands):
        carry, state, chosen = operands
        if first_token:
            carry, z = modeling.exit_step(cfg, prev_p, layer_p, ramp_p, carry, bias)
        elif last:
            z = modeling.first_token_exit(cfg, layer_p, ramp_p, carry, bias)[1]
        else:
            carry, z = modeling.layer_ramp_step(cfg, layer_p, ramp_p, carry, bias)
        state, now, chosen = _decide(policy, cfg.num_hidden_layers, layer, z, state, chosen)
        return carry, state, now, chosen

    def stay(operands):
        carry, state, chosen = operands
        return carry, state, done, chosen

    return lax.cond(done, stay, run, (carry, state, chosen))


def _dummy_batch():
    ids = jnp.zeros((1, 2), jnp.int32)
    return ids, ids, jnp.ones((1, 2), jnp.int32)


# ---- on device: one lax.while_loop (`EarlyExitModel.device_exits`) -------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "first_token"))
def device_exits(cfg, params, batch, policy: Policy, first_token: bool = False):
    """Exit loop on the device, with the same steps as `EarlyExitModel.ramp_steps` (`first_token`:
    the first-token exit steps, else the plain layer step): returns (exit_layer [B], logits [B, C]).

    Layer i of the loop is `lax.switch(i, ...)` over one branch per layer, each reading its own
    layer's parameters as they are: indexing weights stacked on an L axis with the traced layer
    number would copy every layer's weights before using them (measured at BERT-base shape, batch 1:
    all 12 layers 41% slower than the dense model that way, 2% with the switch)."""
    L = cfg.num_hidden_layers
    layer_p = [modeling.layer_params(cfg, params, i) for i in range(L)]
    ramp_p = [modeling.ramp_params(cfg, params, i) for i in range(L)]
    if first_token:
        carry, bias, z = modeling.first_exit_step(cfg, params, batch)
        branch = lambda i: lambda carry: modeling.exit_step(  # noqa: E731
            cfg, layer_p[i - 1], layer_p[i], ramp_p[i], carry, bias)
    else:
        carry, bias = modeling.embed(cfg, params, batch)
        branch = lambda i: lambda carry: modeling.layer_ramp_step(cfg, layer_p[i], ramp_p[i], carry, bias)  # noqa: E731
        carry, z = branch(0)(carry)
    branches = [branch(i) for i in range(1, L)] or [lambda carry: (carry, z)]  # L = 1: the loop never runs

    def step(layer, carry):  # layer: 0-based, 1..L-1, traced
        return lax.switch(layer - 1, branches, carry)

    def decide(layer, z, state, exit_layer, chosen):  # layer: 1-based, traced
        return policies.device_decide(policy, L, layer, z, state, exit_layer, chosen)

    def body(loop):
        layer, carry, state, exit_layer, chosen = loop  # `layer` ramps decided so far
        carry, z = step(layer, carry)
        return (layer + 1, carry, *decide(layer + 1, z, state, exit_layer, chosen))

    def cond(loop):
        layer, _, _, exit_layer, _ = loop
        return (layer < L) & jnp.any(exit_layer == 0)

    size = batch["input_ids"].shape[0]
    state, exit_layer, chosen = decide(jnp.int32(1), z, policies.init_state(policy, size, jnp),
                                       jnp.zeros(size, jnp.int32), jnp.zeros((size, cfg.num_labels), jnp.float32))
    _, _, _, exit_layer, chosen = lax.while_loop(cond, body, (jnp.int32(1), carry, state, exit_layer, chosen))
    return exit_layer, chosen
