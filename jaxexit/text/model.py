"""`EarlyExitModel`: the multi-exit encoder with its parameters and tokenizer, ready to run."""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxexit.exits import policies
from jaxexit.exits.policies import Policy
from jaxexit.text import exit_steps, hf_import, modeling
from jaxexit.text.config import EncoderConfig
from jaxexit.text.exit_steps import StepPlan
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
    baseline slower and early exit look better."""
    hidden, bias = exit_steps.embed(cfg, params, batch)
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
    `exit_step`, `decided_head_step`, `decided_step`, all from `jaxexit.text.exit_steps`) are jitted
    once per model and reused for every layer. It is a `jaxexit.exits.types.RampModel`, with the
    pipelined latency path's `decided_steps`.
    """

    # Batches of at least this many tokens (rows x length) take the first-token exit steps
    # (`step_plan`): below it they cost more than the plain steps, as weight reads dominate
    # (results/exit_steps.md).
    first_token_steps_from = 512

    def __init__(self, config: EncoderConfig, params: dict, tokenizer: Tokenizer | None = None,
                 source: str | None = None):
        self.config = config
        self._params = jax.tree_util.tree_map(jnp.asarray, params)
        self._step_params = None
        self.tokenizer = tokenizer
        self.source = source
        self.embed_step = jax.jit(functools.partial(exit_steps.embed, config))
        self.layer_step = jax.jit(functools.partial(exit_steps.layer_ramp_step, config))
        # the exit paths' steps, each compiled once per `StepPlan.kind` (a static argument)
        step = functools.partial(jax.jit, static_argnames=("kind",))
        self.first_exit_step = step(functools.partial(exit_steps.first_exit_step, config))
        self.exit_step = step(functools.partial(exit_steps.exit_step, config))
        # the pipelined latency path's (`decided_steps`): layer, ramp and the policy's step
        self.decided_head_step = step(functools.partial(exit_steps.decided_head_step, config))
        self.decided_step = step(functools.partial(exit_steps.decided_step, config))

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, num_labels: int | None = None, *,
                        ramp_pooler: str | None = None, ramp_input: str | None = None, max_length: int | None = None,
                        seed: int = 0, **config_overrides) -> "EarlyExitModel":
        """Load a Hugging Face checkpoint (local directory or hub id) and add fresh ramps (defaults:
        2 labels, per_ramp poolers, cls input).

        Reads `config.json`, the safetensors weights and the tokenizer files; no torch needed.
        `max_length` (tokens per input) defaults to 128, or fewer if the checkpoint has fewer positions.
        A jaxexit export (`save_pretrained`) loads whole, ramps included, unless a setting given here
        differs from it (`export.from_pretrained_export`: then its backbone only, as above).
        """
        from jaxexit.text import export

        directory = hf_import.resolve(name_or_path)
        asked = {"num_labels": num_labels, "ramp_pooler": ramp_pooler, "ramp_input": ramp_input, **config_overrides}
        if export.is_export(directory):
            model = export.from_pretrained_export(directory, asked, name_or_path, max_length)
            if model is not None:
                return model
        config = EncoderConfig.from_hf_file(
            directory / "config.json", num_labels=2 if num_labels is None else num_labels,
            ramp_pooler=ramp_pooler or "per_ramp", ramp_input=ramp_input or "cls", **config_overrides
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

    def save_pretrained(self, out_dir: str | os.PathLike, **kwargs):
        """Write this model as a Hugging Face checkpoint directory (`jaxexit.text.export.save_pretrained`:
        `task`, `calibration`, `extra`); `from_pretrained(out_dir)` reads it back exactly."""
        from jaxexit.text import export

        return export.save_pretrained(self, out_dir, **kwargs)

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

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @property
    def has_lte(self) -> bool:
        """Whether the ramps also give a learning-to-exit output (`RampOutputs`)."""
        return self.config.lte

    def step_plan(self, shape: tuple[int, int]) -> StepPlan:
        """The exit steps a batch of `shape` (rows, length) takes, on host and device: the first-token
        exit steps from `first_token_steps_from` tokens with ramps that read the first token
        (mean-pooled ramps read every token of their layer), else the plain layer step, whose last
        layer first-token ramps need at the first token only."""
        cls = self.config.ramp_input == "cls"
        first_token = cls and shape[0] * shape[1] >= self.first_token_steps_from
        return StepPlan(self.num_layers, first_token, cls and not first_token)

    def ramp_steps(self, batch: dict):
        """Ramp 1..L logits `[B, C]` of `batch` one layer at a time, by the steps of `step_plan`: a
        generator, so layer i+1 is dispatched only when the caller asks for it. `send(rows)` (an
        index array) instead of `next` keeps only those rows of the batch for the layers that follow."""
        batch = self._check(batch)
        plan = self.step_plan(batch["input_ids"].shape)
        carry, bias, z = self.first_exit_step(plan.kind(1), self._embeddings(), self.layer_params(0),
                                              self.ramp_params(0), batch)
        for layer in range(2, self.num_layers + 1):
            rows = yield z
            if rows is not None:
                carry, bias = _take_rows((carry, bias), rows)
            carry, z = self.exit_step(plan.kind(layer), self._prev_params(plan, layer), self.layer_params(layer - 1),
                                      self.ramp_params(layer - 1), carry, bias)
        yield z

    def decided_steps(self, policy: Policy, batch: dict, head_layers: int):
        """The pipelined latency path's steps (`runners.exit_one`) on a batch of one row: yields
        `(done, chosen)` device arrays after ramps m = `head_layers`, m + 1, ..., L, each step
        dispatched before the caller reads the one before. The first call runs layers 1..m (no row
        can exit before m); every later step does nothing once the previous one's `done` is set."""
        batch = self._check(batch)
        plan, m = self.step_plan(batch["input_ids"].shape), head_layers
        every = policies.reads_every_ramp(policy)
        ramps = tuple(self.ramp_params(i) if every or i == m - 1 else None for i in range(m))
        carry, bias, state, done, chosen = self.decided_head_step(
            plan.kind(m), self._embeddings(), tuple(self.layer_params(i) for i in range(m)), ramps, batch, policy)
        yield done, chosen
        for layer in range(m + 1, self.num_layers + 1):
            carry, state, done, chosen = self.decided_step(
                plan.kind(layer), self._prev_params(plan, layer), self.layer_params(layer - 1),
                self.ramp_params(layer - 1), carry, bias, policy, state, done, chosen, np.int32(layer))
            yield done, chosen

    def device_exits(self, batch: dict, policy: Policy):
        """The whole exit loop in one jitted `lax.while_loop`: `(exit_layer [B], outputs [B, C])`."""
        batch = self._check(batch)
        return _device_exits(self.config, self.step_plan(batch["input_ids"].shape), self.step_params, batch, policy)

    def inputs(self, split, rows) -> dict:
        """The padded batch of inputs `rows` of an `EncodedSplit` (the runners' `RampModel.inputs`)."""
        return self.tokenizer.pad([split.rows[i] for i in rows], [split.types[i] for i in rows])

    def _embeddings(self) -> dict:
        return {"backbone": {"embeddings": self.step_params["backbone"]["embeddings"]}}

    def _prev_params(self, plan: StepPlan, layer: int):
        """What the step of 1-based `layer` >= 2 finishes: layer - 1 on the first-token steps."""
        return self.layer_params(layer - 2) if plan.first_token else None

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


def _dummy_batch():
    ids = jnp.zeros((1, 2), jnp.int32)
    return ids, ids, jnp.ones((1, 2), jnp.int32)


_device_exits = jax.jit(exit_steps.device_exits, static_argnames=("cfg", "plan"))
