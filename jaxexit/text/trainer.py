"""Fine-tuning on GLUE: DeeBERT's two stages or the joint scheme, data parallel, resumable.

Read top to bottom: mesh -> data -> model -> (per stage) optimiser, sharded state, restore, the
shared update loop (jaxexit/training/loop.py) with evaluation and checkpoints -> the final model
and summary.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxexit.text import batches, glue, metrics, steps
from jaxexit.text.model import EarlyExitModel, init_lte
from jaxexit.text.train_config import TrainConfig
from jaxexit.training import logs, loop, optim, parallel
from jaxexit.training.checkpoint import RunDir, timestamp, write_text
from jaxexit.training.stages import Stage

log = logging.getLogger(__name__)


# ---- evaluation --------------------------------------------------------------------------------
def ramp_logits_for_split(model_cfg, params, tokenizer, split: batches.EncodedSplit, batch_size: int, mesh,
                          step=steps.eval_logits):
    """Every ramp's logits `[L, N, C]` over a split, in the split's order (eval mode); with
    `step=steps.eval_lte`, the learning-to-exit module's predicted errors `[L, N]`."""
    fn = jax.jit(functools.partial(step, model_cfg))
    out = None
    for positions, batch in batches.eval_batches(tokenizer, split, batch_size):
        inputs = parallel.shard_batch({k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}, mesh)
        values = np.asarray(multihost_utils.process_allgather(fn(params, inputs), tiled=True))
        if out is None:
            out = np.zeros((values.shape[0], len(split), *values.shape[2:]), np.float32)
        out[:, positions] = values[:, : len(positions)]
    return out


def layer_scores(task: glue.Task, logits: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Each ramp's task metrics on one split, ramp 1 first."""
    preds = logits[..., 0] if task.is_regression else logits.argmax(-1)
    return [metrics.task_metrics(task, p, labels) for p in preds]


def layer_table(task: glue.Task, scores: dict[str, list[dict]]) -> str:
    """CSV: one row per ramp, one column per (split, metric)."""
    columns = [(split, name) for split, rows in scores.items() for name in rows[0]]
    lines = ["layer," + ",".join(f"{split}_{name}" for split, name in columns)]
    for i in range(len(next(iter(scores.values())))):
        lines.append(f"{i + 1}," + ",".join(f"{scores[s][i][n]:.4f}" for s, n in columns))
    return "\n".join(lines) + "\n"


def format_table(task: glue.Task, scores: dict[str, list[dict]]) -> str:
    rows = layer_table(task, scores).strip().split("\n")
    cells = [r.split(",") for r in rows]
    widths = [max(len(c[j]) for c in cells) for j in range(len(cells[0]))]
    return "\n".join("  ".join(c[j].rjust(widths[j]) for j in range(len(c))) for c in cells)


# ---- the run -----------------------------------------------------------------------------------
def finetune(cfg: TrainConfig, resume: str | None = None, progress: bool = True, on_step=None) -> RunDir:
    """Fine-tune `cfg.model` on `cfg.task`; returns the run directory (see jaxexit/training/checkpoint.py).

    `on_step(run, stage, step)`, if given, is called after every step's bookkeeping (tests use it
    to kill a run at a chosen point).
    """
    started = time.time()
    run = None
    if resume:  # the run being resumed: its saved config wins, before anything is built from cfg
        run = RunDir.latest(cfg.output_dir) if resume == "latest" else RunDir(resume)
        if not (run.path / "train_config.json").is_file():
            raise FileNotFoundError(f"cannot resume {run.path}: not a train/finetune.py run directory "
                                    "(no train_config.json)")
        saved = TrainConfig.from_dict(run.train_config())
        if saved != cfg:
            log.warning("resuming %s with its saved config (command-line settings ignored)", run.path)
        cfg = saved
    task = glue.get_task(cfg.task)
    if run is None:  # a new run: refuse a taken name before anything slow happens
        name = cfg.run_name or f"{task.name}-{cfg.scheme}-{timestamp()}"
        RunDir.check_free(cfg.output_dir, name)
    mesh = parallel.training_mesh(cfg.batch_size, cfg.eval_batch_size)

    # Model and tokenizer.
    if cfg.lte_from:
        model, cfg = _lte_source(cfg, task)
    else:
        model = EarlyExitModel.from_pretrained(cfg.model, num_labels=task.num_labels, ramp_pooler=cfg.pooler,
                                               ramp_input=cfg.ramp_input, max_length=cfg.max_length, seed=cfg.seed,
                                               lte=cfg.uses_lte)
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer files; fine-tuning needs them")
    mcfg, tokenizer = model.config, model.tokenizer
    start = _stage1_params(cfg, task, model) if cfg.stage1_from else model.params

    # Data, tokenised once (before the run directory exists, so a data error leaves nothing behind).
    def examples(split: str, limit: int):
        return _limit(glue.load_examples(task, split, cfg.data_dir, skip_bad_rows=cfg.skip_bad_rows), limit)

    train_split = batches.encode_examples(tokenizer, task, examples("train", cfg.max_train_examples))
    if task.is_regression and not cfg.lte_from:  # fresh regression ramps start at the labels' mean (docs/training.md)
        fresh = range(mcfg.num_hidden_layers - 1) if cfg.stage1_from else range(mcfg.num_hidden_layers)
        start = ramps_at_label_mean(start, fresh, float(np.mean(train_split.labels)))
    devs = {s: batches.encode_examples(tokenizer, task, examples(s, cfg.max_eval_examples)) for s in task.dev_splits}

    if run is None:
        run = RunDir.create(cfg.output_dir, name, cfg.to_dict(), mcfg, tokenizer)
    if run.writer:
        logs.log_to_file(run.path)  # library chatter from here on (and before) -> train.log
    per_epoch = batches.steps_per_epoch(len(train_split), cfg.batch_size)
    totals = {int(s): _stage_steps(cfg, s, per_epoch) for s in cfg.stages}  # ints: as logged and summarised
    offsets = dict(zip(cfg.stages, np.cumsum([0] + [totals[s] for s in cfg.stages])[:-1].tolist()))
    log.info("%s: %d train examples, %d steps/epoch, stages %s, %d devices",
             task.tsv_dir, len(train_split), per_epoch, totals, mesh.devices.size)

    job = _Job(cfg, task, mcfg, tokenizer, run, mesh, train_split, devs, per_epoch)
    params = parallel.replicate(start, mesh)
    meta = run.latest_meta() if resume else None
    if resume and meta is None:
        log.warning("%s has no checkpoint yet: starting from the beginning", run.path)
    if meta is not None:
        run.truncate_log(meta["global_step"])
    final_scores = None  # the last stage's last evaluation
    for stage in cfg.stages:
        if meta is not None and cfg.stages.index(stage) < cfg.stages.index(meta["stage"]):
            continue  # finished before the interruption
        resume_stage = meta is not None and meta["stage"] == stage
        # RAMPS starts from BACKBONE's last parameters (the papers' rule).
        params, final_scores = _train_stage(job, stage, params, totals[stage], offsets[stage], resume_stage,
                                            progress, on_step)
        meta = None

    run.wait()
    if final_scores is None:  # resumed after the last step: evaluate once more
        final_scores = _evaluate(job, params, cfg.stages[-1], totals[cfg.stages[-1]], sum(totals.values()), None)
    summary = {
        "task": task.name, "scheme": cfg.scheme, "model": cfg.model, "stages": totals,
        "final_ramp": {s: rows[-1] for s, rows in final_scores.items()},
        "per_layer": final_scores, "wall_time_s": round(time.time() - started, 1),
        "command": " ".join(sys.argv), "devices": mesh.devices.size, "checkpoint_rule": "last step",
    }
    if cfg.stage1_from:
        summary["stage1_from"] = cfg.stage1_from
    if cfg.lte_from:
        summary["lte_from"] = cfg.lte_from
    run.save_model(params, summary)
    return run


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every stage of one run shares."""

    cfg: TrainConfig
    task: glue.Task
    mcfg: object
    tokenizer: object
    run: RunDir
    mesh: object
    train: batches.EncodedSplit
    devs: dict
    per_epoch: int


def _train_stage(job: _Job, stage: Stage, params, total: int, offset: int, resume: bool, progress: bool, on_step):
    """One stage from `params` (or from the run's last checkpoint when `resume`): the shared update
    loop with this stage's step, batches and records. Returns (last params, last dev scores)."""
    cfg, run, mesh = job.cfg, job.run, job.mesh
    tx, labels = optim.make_optimizer(
        params, stage=stage, num_layers=job.mcfg.num_hidden_layers, lr=cfg.stage_lr(stage), total_steps=total,
        warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, b1=cfg.adam_b1, b2=cfg.adam_b2,
        eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm)
    replicated = parallel.replicated(mesh)
    init = jax.jit(lambda p: {"params": p, "opt_state": tx.init(p), "step": np.int32(0)}, out_shardings=replicated)
    if resume:
        state = loop.restore(run, init, params, sharding=replicated)
        log.info("resumed %s at step %d of %d", stage.title, int(state["step"]), total)
    else:
        state = init(params)
    step_fn = jax.jit(functools.partial(steps.train_step, job.mcfg, stage, tx, labels), donate_argnums=(0,))
    # RBG keys: dropout masks far cheaper than threefry's on CPU (docs/speed.md#training).
    rng = jax.random.fold_in(jax.random.key(cfg.seed, impl="rbg"), int(stage))

    def train_batches(epoch: int, first: int):
        return batches.train_batches(job.tokenizer, job.train, cfg.batch_size, cfg.seed * 1000 + int(stage), epoch,
                                     start=first)

    hooks = loop.Hooks(
        record=lambda out, step: {"stage": int(stage), "ramp_losses": np.asarray(out["ramp_losses"]).round(5).tolist()},
        evaluate=lambda state, step, global_step, epoch: _evaluate(job, state["params"], stage, step, global_step,
                                                                   epoch),
        meta=lambda step, epoch: {"stage": int(stage), "global_step": offset + step, "step": step,
                                  "config": cfg.to_dict()},
        on_step=None if on_step is None else lambda run, step: on_step(run, stage, step))
    state, scores = loop.train_loop(
        run, state, lambda state, batch: step_fn(state, parallel.shard_batch(batch, mesh), rng), train_batches,
        loop.Steps(total, job.per_epoch, cfg.batch_size, cfg.log_every, cfg.save_every, offset), hooks,
        desc=stage.title, progress=progress)
    return state["params"], scores


def ramps_at_label_mean(params: dict, ramps, mean: float) -> dict:
    """`params` with the output bias of ramps `ramps` (0-based) set to `mean`, the training labels'
    mean (regression): a ramp starting at zero would have squared errors of ~mean^2 and dominate
    the joint loss (docs/training.md). Other leaves are shared, not copied."""
    out = {**params, "ramps": dict(params["ramps"])}
    for i in ramps:
        ramp = out["ramps"][str(i)]
        classifier = {**ramp["classifier"], "bias": np.full_like(np.asarray(ramp["classifier"]["bias"]), mean)}
        out["ramps"][str(i)] = {**ramp, "classifier": classifier}
    return out


def _lte_source(cfg: TrainConfig, task: glue.Task) -> tuple[EarlyExitModel, TrainConfig]:
    """A finished run's model with a fresh learning-to-exit module, and `cfg` with the run's scheme,
    ramp settings, model and max length (the LTE stage trains on exactly that model)."""
    source = EarlyExitModel.from_run(cfg.lte_from)
    saved = RunDir(cfg.lte_from).train_config()
    if saved.get("task") != task.name:
        raise ValueError(f"lte_from {cfg.lte_from} was trained on {saved.get('task')}, not {task.name}")
    if source.config.lte:
        raise ValueError(f"lte_from {cfg.lte_from} already has a learning-to-exit module")
    config = dataclasses.replace(source.config, lte=True)
    params = {**source.params, "lte": init_lte(config, jax.random.PRNGKey(cfg.seed))}
    inherited = {k: saved[k] for k in ("scheme", "ramp_pooler", "ramp_input", "model", "max_length") if k in saved}
    changed = {k: v for k, v in inherited.items() if getattr(cfg, k) != v}
    if changed:
        log.info("lte_from: %s", ", ".join(f"{k}={v} (from the run)" for k, v in changed.items()))
    return EarlyExitModel(config, params, source.tokenizer, source=cfg.lte_from), dataclasses.replace(cfg, **inherited)


def _stage1_params(cfg: TrainConfig, task: glue.Task, fresh: EarlyExitModel) -> dict:
    """Stage 2's starting point from a finished run: its backbone and ramp L, fresh ramps 1..L-1.

    Ramps 1..L-1 come from `fresh` (the pretrained checkpoint with newly initialised ramps), so
    re-running stage 2 with other settings starts where DeeBERT's stage 2 starts.
    """
    source = EarlyExitModel.from_run(cfg.stage1_from)
    saved_task = RunDir(cfg.stage1_from).train_config().get("task")
    mine, theirs = fresh.config, source.config
    mismatch = [f"{name}: {getattr(theirs, name)} != {getattr(mine, name)}"
                for name in ("num_hidden_layers", "hidden_size", "num_labels", "ramp_pooler", "ramp_input", "vocab_size")
                if getattr(theirs, name) != getattr(mine, name)]
    if saved_task != task.name or mismatch:
        raise ValueError(f"stage1_from {cfg.stage1_from} does not fit this run (task {saved_task} vs {task.name}"
                         + (f"; {', '.join(mismatch)}" if mismatch else "") + ")")
    ramps = dict(source.params["ramps"])
    for i in range(mine.num_hidden_layers - 1):
        ramps[str(i)] = fresh.params["ramps"][str(i)]
    return {"backbone": source.params["backbone"], "ramps": ramps}


def _evaluate(job: _Job, params, stage, step, global_step, epoch):
    scores = {}
    lte = {}
    for split, data in job.devs.items():
        logits = ramp_logits_for_split(job.mcfg, params, job.tokenizer, data, job.cfg.eval_batch_size, job.mesh)
        scores[split] = layer_scores(job.task, logits, data.labels)
        if stage == Stage.LTE:  # how well the LTE predicts each ramp's error: mean squared difference, per ramp
            u = ramp_logits_for_split(job.mcfg, params, job.tokenizer, data, job.cfg.eval_batch_size, job.mesh,
                                      step=steps.eval_lte)
            target = np.asarray(steps.lte_targets(logits, data.labels, job.task.is_regression))
            lte[split] = np.mean(np.square(u - target), axis=1).round(5).tolist()
    record = {"kind": "eval", "stage": int(stage), "step": step, "global_step": global_step, "epoch": epoch,
              "per_layer": scores}
    if lte:
        record["lte_mse"] = lte
    job.run.log(record)
    if job.run.writer and lte:
        print(f"\n{job.task.tsv_dir} dev, learning to exit: mean squared error of the predicted ramp errors, "
              f"ramps 1..L: {lte}", flush=True)
    if job.run.writer:
        write_text(job.run.path / "layers.csv", layer_table(job.task, scores))
        print(f"\n{job.task.tsv_dir} dev, {Stage(stage).title}, epoch {epoch} (per ramp):\n"
              f"{format_table(job.task, scores)}", flush=True)
    return scores


def _stage_steps(cfg: TrainConfig, stage: Stage, per_epoch: int) -> int:
    total = math.ceil(cfg.stage_epochs(stage) * per_epoch)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def _limit(examples, n: int):
    return examples[:n] if n else examples
