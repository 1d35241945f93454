"""The one training loop of text (every scheme and stage) and vision: epochs of steps from a
resumable position, progress, periodic training records, evaluation and checkpoints at epoch
ends, and stop-on-signal. What differs between models comes in as the step function, the batch
source and a few hooks (`Hooks`); the loop itself knows no model.

Resume: batches depend only on (seed, epoch, batch index), so a loop started at step `s` of a
restored state takes exactly the steps an uninterrupted one takes from `s` (docs/training.md).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable

import jax

from jaxexit.training.checkpoint import RunDir, StopRequest, stop_on_signal
from jaxexit.training.parallel import any_process

State = Any


@dataclasses.dataclass(frozen=True)
class Steps:
    """The loop's arithmetic: `total` steps of `per_epoch` each, a training record every
    `log_every` steps, a checkpoint every `save_every` (0: epoch ends only) and at every epoch's end;
    `offset` is the global step of step 0 (the stages before this one)."""

    total: int
    per_epoch: int
    batch_size: int
    log_every: int
    save_every: int
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What a model adds to the loop.

    record(out, step) -> the train record's own fields (beside kind, step, global_step, epoch,
        loss, examples_per_s and time);
    evaluate(state, step, global_step, epoch) -> scores, after every epoch and the last step;
    meta(step, epoch) -> the checkpoint's meta.json;
    on_step(run, step), if given, after every step's bookkeeping (tests interrupt runs with it).
    """

    record: Callable[[dict, int], dict]
    evaluate: Callable[[State, int, int, int], Any]
    meta: Callable[[int, int], dict]
    on_step: Callable[[RunDir, int], None] | None = None


def restore(run: RunDir, init: Callable, *args, sharding) -> State:
    """The run's last checkpoint, shaped (and placed with `sharding`) like `init(*args)`."""
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                      jax.eval_shape(init, *args))
    return run.restore_state(abstract)


def train_loop(run: RunDir, state: State, step_fn: Callable[[State, dict], tuple[State, dict]],
               batches: Callable[[int, int], Iterable[dict]], steps: Steps, hooks: Hooks, *, desc: str,
               progress: bool = True, clock: StepClock | None = None) -> tuple[State, Any]:
    """Steps from `state["step"]` to `steps.total`: `step_fn(state, batch) -> (state, out)` on
    `batches(epoch, first)` (epoch `epoch`'s batches from index `first`). Returns the last state
    and the last evaluation's scores (None when no step was left). Ctrl-C or SIGTERM saves the step
    in progress and raises `checkpoint.Stopped`."""
    scores = None
    step = int(state["step"])
    bar = progress_bar(progress, steps.total, desc, step)
    seen, tick = 0, time.time()
    with stop_on_signal() as stop:
        while step < steps.total:
            epoch, first = divmod(step, steps.per_epoch)
            for batch in batches(epoch, first):
                if clock is not None:
                    clock.start()
                state, out = step_fn(state, batch)
                if clock is not None and clock.first_step_s is None:
                    clock.stop(state)
                step += 1
                seen += steps.batch_size
                global_step = steps.offset + step
                if step % steps.log_every == 0 or step == steps.total:
                    loss = float(out["loss"])
                    rate = seen / max(time.time() - tick, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.1f}")
                    run.log({"kind": "train", "step": step, "global_step": global_step, "epoch": epoch,
                             "loss": loss, "examples_per_s": rate, "time": round(time.time(), 1),
                             **hooks.record(out, step)})
                    seen, tick = 0, time.time()
                bar.update(1)
                end_of_epoch = step % steps.per_epoch == 0
                saved = end_of_epoch or step == steps.total or bool(steps.save_every and step % steps.save_every == 0)
                if saved:
                    if clock is not None:
                        clock.stop(state)  # evaluation and checkpoints do not count as training time
                    if end_of_epoch or step == steps.total:
                        scores = hooks.evaluate(state, step, global_step, epoch + 1)
                    run.save_state(global_step, state, hooks.meta(step, epoch))
                if hooks.on_step is not None:
                    hooks.on_step(run, step)
                if stop_agreed(stop):  # Ctrl-C / SIGTERM: save this step, then stop
                    bar.close()
                    run.stop(stop, global_step, state, hooks.meta(step, epoch), saved)
                if step == steps.total:
                    break
    if clock is not None:
        clock.stop(state)
    bar.close()
    return state, scores


def stop_agreed(request: StopRequest) -> bool:
    """Whether to stop after this step: this process's `request`, or in a multi-process run any
    process's (a launcher's SIGTERM reaches processes at different steps; all must save the same
    step, so every step asks every process, at the same point)."""
    local = bool(request)  # read once: a signal arriving meanwhile counts at the next step, everywhere
    agreed = any_process(local)
    if agreed and not local and request.signal is None:
        request.signal = "a signal to another process"
    return agreed


class StepClock:
    """Seconds per training step in this process: the first step (it compiles) timed alone,
    evaluation and checkpoints excluded. Steps run asynchronously: the clock stops on a finished state."""

    def __init__(self):
        self.first_step_s, self.seconds, self.steps = None, 0.0, 0
        self._since, self._count = None, 0

    def start(self):
        if self._since is None:
            self._since, self._count = time.perf_counter(), 0
        self._count += 1

    def stop(self, state):
        if self._since is None:
            return
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - self._since
        if self.first_step_s is None:  # the loop stops the clock right after the first step
            self.first_step_s = elapsed
        else:
            self.seconds, self.steps = self.seconds + elapsed, self.steps + self._count
        self._since = None

    def summary(self) -> dict:
        return {"first_step_s": None if self.first_step_s is None else round(self.first_step_s, 3),
                "seconds_per_step": round(self.seconds / self.steps, 4) if self.steps else None,
                "timed_steps": self.steps}


def progress_bar(enabled: bool, total: int, desc: str, initial: int):
    """A tqdm bar on process 0 (disabled elsewhere, or when not `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True)
