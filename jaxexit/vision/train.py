"""Training of the multi-exit CIFAR ResNet (PCEE-BERT section 4.6.4): joint loss, SGD, resumable.

Read top to bottom: the loss and optimiser (pure) -> the jitted steps -> data -> evaluation ->
the run (mesh, data, run directory, sharded state, restore, the shared update loop of
jaxexit/training/loop.py with per-epoch evaluation and checkpoints, the final model and summary)
-> `load_run`.

* Loss: PABEE/PCEE's joint weighted sum over the L exits, `sum_i i * CE_i / sum_i i`, each exit's
  cross-entropy the mean over the batch (jaxexit/training/losses.py, shared with the text models).
* Optimiser: SGD, momentum 0.9 (heavy ball), weight decay as coupled L2 on conv and dense kernels
  only (`decay_mask`), learning-rate schedule `cosine` or `step` over the run's total steps
  (jaxexit/vision/config.py says why).
* BatchNorm: training steps normalise with the batch's statistics and update the running ones;
  evaluation uses the running ones. Under data parallelism the batch is one global array sharded
  over the mesh, so its statistics are the global batch's (the same numbers as on one device).
* Resume: the state `{"params", "batch_stats", "opt_state", "step"}` is checkpointed (orbax,
  through `checkpoint.RunDir`) every `save_every` steps and at every epoch's end; batches depend
  only on `(seed, epoch, batch index)` (`images.train_batches`), so a resumed run takes exactly
  the steps an uninterrupted one takes and ends with the same variables. Ctrl-C or SIGTERM saves
  the step in progress and stops the run (`checkpoint.Stopped`) instead of losing the steps since
  the last checkpoint.

Run directory `<output_dir>/<run_name>/`: `train_config.json` (every setting), `resnet_config.json`,
`metrics.jsonl` (train and eval records), `layers.csv` (per-exit test accuracy, the last
evaluation), `checkpoints/` (resumable state), `model/` (final `{"params", "batch_stats"}`, written
atomically by orbax) and `summary.json` (written after `model/`: its presence means "finished"),
`train.log` from the command line. Unlike text runs it does not move `<output_dir>/LATEST`, so the
text tools' default checkpoint stays a text model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxexit.training import logs, loop, parallel
from jaxexit.training.checkpoint import RunDir, read_json, timestamp, write_json, write_text
from jaxexit.training.losses import joint_weights, ramp_losses
from jaxexit.vision import images, resnet
from jaxexit.vision.config import VisionTrainConfig
from jaxexit.vision.resnet import ResNetConfig

log = logging.getLogger(__name__)
Variables = dict[str, Any]


# ---- loss and optimiser --------------------------------------------------------------------------
def joint_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(sum_i w_i * CE_i, CE [L])` from exit logits `[L, B, C]`, `w_i = i / sum_i i`."""
    losses = ramp_losses(logits, labels, jnp.ones(labels.shape, jnp.float32), regression=False)
    return (joint_weights(logits.shape[0]) * losses).sum(), losses


def decay_mask(params) -> Any:
    """True at the leaves weight decay applies to: convolution and dense kernels. Not BatchNorm's
    scale and bias, not the exits' biases."""
    return jax.tree_util.tree_map_with_path(lambda keys, _: getattr(keys[-1], "key", None) == "kernel", params)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """Everything the optimiser depends on; hashable, so the jitted step takes it as a static
    argument and runs with the same settings reuse one compiled program."""

    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    total_steps: int

    @classmethod
    def from_config(cls, cfg: VisionTrainConfig, total_steps: int) -> OptimizerSpec:
        return cls(cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, total_steps)

    def learning_rate(self) -> optax.Schedule:
        """Of the optimiser step count (0-based). cosine: `lr * (1 + cos(pi * t / T)) / 2`; step:
        `lr`, then `lr / 10` from step `T // 2`, `lr / 100` from step `3T // 4`."""
        total = max(self.total_steps, 1)
        if self.schedule == "cosine":
            return optax.cosine_decay_schedule(self.lr, total)
        if self.schedule == "step":
            first, second = total // 2, (3 * total) // 4
            return lambda count: self.lr * jnp.where(jnp.asarray(count) >= second, 0.01,
                                                     jnp.where(jnp.asarray(count) >= first, 0.1, 1.0))
        raise ValueError(f"unknown schedule {self.schedule!r}")

    def make(self) -> optax.GradientTransformation:
        # add_decayed_weights before sgd: L2 joins the gradient before momentum, as in He et al.'s
        # (and torch.optim.SGD's) weight decay.
        return optax.chain(optax.add_decayed_weights(self.weight_decay, mask=decay_mask),
                           optax.sgd(self.learning_rate(), momentum=self.momentum, nesterov=False))


# ---- jitted steps --------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def init_state(model_cfg: ResNetConfig, opt: OptimizerSpec, image_size: tuple[int, int], key: jax.Array) -> dict:
    """Fresh `{"params", "batch_stats", "opt_state", "step"}`."""
    variables = resnet.init_variables(model_cfg, key, image_size)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "opt_state": opt.make().init(variables["params"]), "step": jnp.int32(0)}


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def train_step(model_cfg: ResNetConfig, opt: OptimizerSpec, state: dict, batch: dict) -> tuple[dict, dict]:
    """One SGD step on the joint loss, BatchNorm in train mode. Returns (state, metrics)."""

    def loss_fn(params):
        logits, updated = resnet.MultiExitResNet(model_cfg).apply(
            {"params": params, "batch_stats": state["batch_stats"]}, batch["image"], train=True,
            mutable=["batch_stats"])
        loss, losses = joint_loss(logits, batch["label"])
        return loss, (losses, updated["batch_stats"], logits[-1])

    (loss, (losses, batch_stats, last)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = opt.make().update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "batch_stats": batch_stats,
                 "opt_state": opt_state, "step": state["step"] + 1}
    accuracy = (last.argmax(-1) == batch["label"]).mean()
    return new_state, {"loss": loss, "exit_losses": losses, "final_exit_accuracy": accuracy}


@functools.partial(jax.jit, static_argnums=0)
def eval_logits(model_cfg: ResNetConfig, variables: Variables, batch_images: jax.Array) -> jax.Array:
    """Every exit's logits `[L, B, C]` in eval mode (BatchNorm's running statistics)."""
    return resnet.MultiExitResNet(model_cfg).apply(variables, batch_images, train=False)


# ---- data ------------------------------------------------------------------------------------------
class VisionData(NamedTuple):
    train_images: np.ndarray   # uint8 [N, H, W, 3]
    train_labels: np.ndarray   # int32 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str


def spread(total: int, n: int) -> np.ndarray:
    """`n` evenly spaced indices into `total` examples (all of them when n is 0 or >= total):
    class-sorted data (image folders) keeps every class, unlike its first n examples."""
    if n <= 0 or n >= total:
        return np.arange(total)
    return (np.arange(n) * total) // n


def load_data(cfg: VisionTrainConfig) -> VisionData:
    """The train and test splits of `cfg.data_dir` (an image folder) or, without one, of tfds'
    `cfg.dataset`, cut to `max_*_examples`."""
    if cfg.data_dir:
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--data-dir {root} does not exist (expected an image folder "
                                    f"{root}/{{train,test}}/<class>/<image>)")
        test = images.load_image_folder(root, "test")  # the small split first: a layout error shows at once
        train = images.load_image_folder(root, "train")
        source = f"image folder {root}"
    else:
        test = images.load_tfds(cfg.dataset, "test")
        train = images.load_tfds(cfg.dataset, "train")
        source = f"tfds {cfg.dataset}"
    if train[2] != test[2]:
        raise ValueError(f"{source}: the train and test splits have different classes ({len(train[2])}: "
                         f"{', '.join(train[2][:5])}... vs {len(test[2])}: {', '.join(test[2][:5])}...)")
    if train[0].shape[1:] != test[0].shape[1:]:
        raise ValueError(f"{source}: train images are {train[0].shape[1:]}, test images {test[0].shape[1:]}")
    keep_train, keep_test = spread(len(train[0]), cfg.max_train_examples), spread(len(test[0]), cfg.max_eval_examples)
    return VisionData(train[0][keep_train], train[1][keep_train], test[0][keep_test], test[1][keep_test],
                      train[2], source)


# ---- evaluation --------------------------------------------------------------------------------------
def exit_logits(model_cfg: ResNetConfig, variables: Variables, pictures: np.ndarray, batch_size: int, mesh,
                normalization=(images.CIFAR10_MEAN, images.CIFAR10_STD)) -> np.ndarray:
    """Every exit's logits `[L, N, C]` over uint8 images `[N, H, W, 3]`, in order, in eval mode."""
    mean, std = normalization
    out = np.empty((model_cfg.num_layers, len(pictures), model_cfg.num_classes), np.float32)
    begin = 0
    no_labels = np.zeros(len(pictures), np.int32)
    for rows, batch in images.eval_batches(pictures, no_labels, batch_size, mean=mean, std=std):
        sharded = parallel.shard_batch({"image": batch["image"]}, mesh)["image"]
        values = np.asarray(multihost_utils.process_allgather(eval_logits(model_cfg, variables, sharded), tiled=True))
        out[:, begin:begin + rows] = values[:, :rows]
        begin += rows
    return out


def exit_accuracy(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """Each exit's accuracy, exit 1 first."""
    return (np.asarray(logits).argmax(-1) == np.asarray(labels)[None]).mean(axis=1).tolist()


def layer_table(accuracy: list[float]) -> str:
    """CSV, the text trainer's layout: one row per exit, `layer,test_accuracy`."""
    return "layer,test_accuracy\n" + "".join(f"{i + 1},{a:.4f}\n" for i, a in enumerate(accuracy))


def format_table(accuracy: list[float]) -> str:
    cells = [row.split(",") for row in layer_table(accuracy).strip().split("\n")]
    widths = [max(len(c[j]) for c in cells) for j in range(2)]
    return "\n".join("  ".join(c[j].rjust(widths[j]) for j in range(2)) for c in cells)


# ---- the run ---------------------------------------------------------------------------------------
class TrainResult(NamedTuple):
    run: RunDir
    config: VisionTrainConfig
    model_config: ResNetConfig
    variables: Variables        # the final {"params", "batch_stats"} (what model/ holds)
    summary: dict


def train(cfg: VisionTrainConfig | None, resume: str | None = None, progress: bool = True,
          on_step=None) -> TrainResult:
    """Train a multi-exit ResNet as `cfg` says, or continue the run directory `resume` (its saved
    config wins; `cfg` may then be None). `on_step(run, step)`, if given, is called after every
    step's bookkeeping (tests interrupt a run with it)."""
    started = time.time()
    run = None
    if resume:
        run = RunDir(resume)
        if not (run.path / "train_config.json").is_file() or not (run.path / "resnet_config.json").is_file():
            raise FileNotFoundError(f"cannot resume {run.path}: not a train/train_vision.py run directory "
                                    "(no train_config.json and resnet_config.json)")
        saved = VisionTrainConfig.from_dict(run.train_config())
        if cfg is not None and saved != cfg:
            log.warning("resuming %s with its saved config (command-line settings ignored)", run.path)
        cfg = saved
    elif cfg is None:
        raise ValueError("train needs a config or a run directory to resume")
    else:  # a new run: refuse a taken name before anything slow happens
        name = cfg.run_name or f"{cfg.dataset}-resnet{cfg.depth}-{timestamp()}"
        RunDir.check_free(cfg.output_dir, name)
    mesh = parallel.training_mesh(cfg.batch_size, cfg.eval_batch_size)

    # Data (before the run directory exists, so that a data error leaves nothing behind).
    data = load_data(cfg)
    per_epoch = images.steps_per_epoch(len(data.train_images), cfg.batch_size)
    if per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(data.train_images)} training images")
    total = per_epoch * cfg.epochs if not cfg.max_steps else min(per_epoch * cfg.epochs, cfg.max_steps)
    model_cfg = cfg.model_config(len(data.class_names))
    image_size = tuple(int(s) for s in data.train_images.shape[1:3])

    if run is None:
        run = RunDir(Path(cfg.output_dir) / name)
        if run.writer:
            run.path.mkdir(parents=True, exist_ok=True)
            write_json(run.path / "train_config.json", cfg.to_dict())
            write_json(run.path / "resnet_config.json", model_cfg.to_dict())
    elif ResNetConfig.from_dict(read_json(run.path / "resnet_config.json")) != model_cfg:
        raise ValueError(f"cannot resume {run.path}: its data now has {model_cfg.num_classes} classes, "
                         f"its model {read_json(run.path / 'resnet_config.json')['num_classes']}")
    if run.writer:
        logs.log_to_file(run.path)
    log.info("%s: %d train / %d test images %dx%d, %d classes; resnet%d, %d exits; %d steps/epoch, %d steps; "
             "%d devices", data.source, len(data.train_images), len(data.test_images), *image_size,
             model_cfg.num_classes, cfg.depth, model_cfg.num_layers, per_epoch, total, mesh.devices.size)

    # Sharded state: born replicated, or restored from the run's last checkpoint.
    opt = OptimizerSpec.from_config(cfg, total)
    replicated = parallel.replicated(mesh)
    init = jax.jit(functools.partial(init_state, model_cfg, opt, image_size), out_shardings=replicated)
    key = jax.random.key(cfg.seed, impl="rbg")  # XLA's generator: compiles far faster than threefry on CPU
    meta = run.latest_meta() if resume else None
    if resume and meta is None:
        log.warning("%s has no checkpoint yet: starting from the beginning", run.path)
        run.truncate_log(0)
    if meta is not None and meta.get("train_examples") != len(data.train_images):
        log.warning("%s was trained on %s images, its data now has %d: the resumed run is not the run it continues",
                    run.path, meta.get("train_examples"), len(data.train_images))
    if meta is not None:
        state = loop.restore(run, init, key, sharding=replicated)
        run.truncate_log(meta["global_step"])
        log.info("resumed %s at step %d of %d", run.path, int(state["step"]), total)
    else:
        state = init(key)

    evaluate = functools.partial(_evaluate, run, model_cfg, data, cfg, mesh)
    lr = opt.learning_rate()
    clock = loop.StepClock()
    mean, std = cfg.normalization

    def train_batches(epoch: int, first: int):
        return images.train_batches(data.train_images, data.train_labels, cfg.batch_size, cfg.seed, epoch, first,
                                    mean=mean, std=std)

    hooks = loop.Hooks(
        record=lambda out, step: {"lr": float(lr(step - 1)), "final_exit_accuracy": float(out["final_exit_accuracy"]),
                                  "exit_losses": np.asarray(out["exit_losses"]).round(5).tolist()},
        evaluate=lambda state, step, global_step, epoch: evaluate(state, step, epoch),
        meta=lambda step, epoch: {"global_step": step, "step": step, "epoch": epoch,
                                  "train_examples": len(data.train_images), "config": cfg.to_dict()},
        on_step=on_step)
    state, scores = loop.train_loop(
        run, state, lambda state, batch: train_step(model_cfg, opt, state, parallel.shard_batch(batch, mesh)),
        train_batches, loop.Steps(total, per_epoch, cfg.batch_size, cfg.log_every, cfg.save_every), hooks,
        desc=f"resnet{cfg.depth}", progress=progress, clock=clock)
    step = int(state["step"])
    run.wait()
    if scores is None:  # resumed after the last step: evaluate once more
        scores = evaluate(state, step, None)

    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    summary = {
        "dataset": cfg.dataset, "model": f"resnet{cfg.depth}", "exits": model_cfg.num_layers, "data": data.source,
        "class_names": list(data.class_names), "image_size": list(image_size),
        "normalization": {"mean": list(mean), "std": list(std)},
        "train_examples": len(data.train_images), "test_examples": len(data.test_images),
        "steps": total, "steps_per_epoch": per_epoch, "epochs": round(total / per_epoch, 4),
        "final_ramp": {"test": {"accuracy": scores[-1]}},
        "per_layer": {"test": [{"accuracy": a} for a in scores]},
        "wall_time_s": round(time.time() - started, 1), **clock.summary(),
        "command": " ".join(sys.argv), "devices": mesh.devices.size, "checkpoint_rule": "last step",
    }
    run.save_model(variables, summary)
    return TrainResult(run, cfg, model_cfg, variables, summary)


def _evaluate(run: RunDir, model_cfg: ResNetConfig, data: VisionData, cfg: VisionTrainConfig, mesh, state,
              step: int, epoch: int | None) -> list[float]:
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    logits = exit_logits(model_cfg, variables, data.test_images, cfg.eval_batch_size, mesh, cfg.normalization)
    accuracy = exit_accuracy(logits, data.test_labels)
    run.log({"kind": "eval", "step": step, "global_step": step, "epoch": epoch,
             "per_layer": {"test": [{"accuracy": a} for a in accuracy]}})
    if run.writer:
        write_text(run.path / "layers.csv", layer_table(accuracy))
    best = int(np.argmax(accuracy))
    log.info("epoch %s, step %d: test accuracy, final exit %.4f, best exit %d (%.4f), first exit %.4f",
             epoch, step, accuracy[-1], best + 1, accuracy[best], accuracy[0])
    return accuracy


# ---- loading a finished run --------------------------------------------------------------------------
def load_run(path, sharding: jax.sharding.Sharding | None = None) -> tuple[ResNetConfig, Variables]:
    """`(model config, {"params", "batch_stats"})` of a finished train/train_vision.py run, ready for
    `resnet.MultiExitResNet(cfg).apply(variables, images, train=False)` or `resnet.stem`/`block_step`.
    Images are normalised with the run's `summary.json["normalization"]`. The arrays are placed with
    `sharding` (default: the first device), whatever devices trained the run."""
    run = RunDir(path)
    if not (run.path / "resnet_config.json").is_file():
        raise FileNotFoundError(f"{run.path} is not a train/train_vision.py run directory (no resnet_config.json)")
    if not run.has_model():
        raise FileNotFoundError(f"{run.path} holds no finished model (model/ and summary.json); was the run "
                                "interrupted? resume it with train/train_vision.py --resume")
    model_cfg = ResNetConfig.from_dict(read_json(run.path / "resnet_config.json"))
    height, width = read_json(run.path / "summary.json")["image_size"]
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # Explicit shardings: orbax would otherwise restore onto the devices that saved the run, and fail
    # on a machine without them (a run trained on 4 GPUs, loaded on 1).
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        jax.eval_shape(lambda: resnet.init_variables(model_cfg, jax.random.key(0, impl="rbg"), (height, width))))
    return model_cfg, run.load_params(abstract)
