"""Early-exit inference runners. All four give the same exits for the same policy:

* `run_latency`  (the papers' setting) one input at a time. On a model with `decided_steps`
  (`types.DecidingModel`; the text model) each jitted step also runs the policy's step and returns
  the exit flag; the host queues layer i+1 before it reads ramp i's flag and stops when it is set,
  layer i+1 then doing nothing on the device (`exit_one`). Otherwise, or with `pipelined=False`,
  the host reads ramp i's logits and decides in numpy before dispatching layer i+1 (`ramp_steps`).
* `run_batched`  many inputs: rows that exit leave the batch, the rest continue in a smaller
  bucketed batch (row counts are multiples of B/8, and powers of two below that, so at most
  8 + log2(B/8) row shapes compile per input length).
* `run_on_device` the whole exit loop in one jitted `lax.while_loop` (`lax.switch` over the
  layers, `jaxexit.exits.device`), the per-row exit state in the carry; the loop stops once every
  row has exited.
* `cached_logits` + `jaxexit.exits.offline` one pass keeping every ramp's logits, then any policy.

The runners read a model through `types.RampModel` alone (text and vision alike). Each returns
`Exits(exit_layer [N] 1-based, prediction [N], logits [N, C] of the exit ramp)`; with the
cross-layer ensemble (`policy.ensemble`), `logits` holds what the prediction is made from instead:
the mean of ramps 1..m's probabilities (regression: outputs), `policies.output`.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np


from jaxexit.exits import policies
from jaxexit.exits.policies import Policy
from jaxexit.exits.types import DecidingModel, RampModel, RampOutputs

MODES = ("latency", "batched", "device", "offline")


@dataclasses.dataclass
class Exits:
    exit_layer: np.ndarray  # [N] int, 1..L
    prediction: np.ndarray  # [N]
    logits: np.ndarray  # [N, C], the exit ramp's (ensemble: the mean probabilities / outputs)
    seconds: float = 0.0  # wall time of the model work (compilation excluded by a warm-up)


def single_inputs(model: RampModel, split) -> list[dict]:
    """Every input of `split` as its own padded batch of one row (the latency runners' inputs)."""
    return [model.inputs(split, [i]) for i in range(len(split))]


def _check(policy: Policy, model: RampModel) -> None:
    if (policy.num_layers, policy.num_labels) != (model.num_layers, model.num_labels):
        raise ValueError(f"{policy} is set for L={policy.num_layers}, C={policy.num_labels}; the model has "
                         f"L={model.num_layers}, C={model.num_labels}")
    if policy.needs_lte and not model.has_lte:
        raise ValueError(policies.NEEDS_LTE.format(policy=policy.label))


def _host(z):
    """A ramp output (logits, or `RampOutputs` with the LTE's) fetched to the host."""
    return jax.tree_util.tree_map(np.asarray, z)


# ---- latency: batch 1 --------------------------------------------------------------------------------
def exit_one(model: RampModel, policy: Policy, batch: dict, pipelined: bool = True,
             head_layers: int | None = None) -> tuple[int, np.ndarray]:
    """One input (`batch` of one row): returns (exit layer, the prediction's logits [C]).

    `pipelined` (the default, on a model with `decided_steps`): each jitted step runs its layer,
    its ramp and the policy's step and returns the exit flag; the host queues layer i+1 before it reads ramp i's flag, and stops there
    when the flag is set, while layer i+1, already queued, finds it set on the device and does
    nothing (`lax.cond`). The device so never waits for the host's read and dispatch. The first
    call runs layers 1..`head_layers` (default `policies.earliest_exit(policy)`: pcee with patience
    p cannot exit before layer p, so its first p layers take one call; 1: a call per layer). Else the
    papers' literal form: the host reads ramp i's logits, steps the policy in numpy, and only then
    dispatches layer i+1. Both give the same exits as every other mode."""
    if _pipelines(model, pipelined):
        return _exit_one_pipelined(model, policy, batch, True, _head(policy, head_layers))
    state = policies.init_state(policy, 1)
    for layer, z in enumerate(model.ramp_steps(batch), start=1):
        z = _host(z)  # the host waits for ramp `layer` and decides before the next dispatch
        state, exits = policies.step(policy, state, z, layer)
        if exits[0] or layer == model.num_layers:
            return layer, policies.output(policy, state, z, layer)[0]


def _head(policy: Policy, head_layers: int | None) -> int:
    first = policies.earliest_exit(policy)
    if head_layers is None:
        return first
    if not 1 <= head_layers <= first:
        raise ValueError(f"head_layers must be in 1..{first} for {policy} (it can exit at layer {first}), "
                         f"got {head_layers}")
    return head_layers


def warm_latency(model: RampModel, policy: Policy, batch: dict, pipelined: bool = True,
                 head_layers: int | None = None) -> None:
    """Compile (and run) every step `exit_one` can take on `batch`'s shape with `policy`'s kind:
    through the last layer, whatever the policy decides. Thresholds are arguments, so another
    setting of the same policy compiles nothing new (but pipelined, another `earliest_exit`, e.g.
    another patience, compiles its own first call)."""
    if _pipelines(model, pipelined):
        _exit_one_pipelined(model, policy, batch, False, _head(policy, head_layers))
    else:
        exit_one(model, policies.make_policy("static", model.num_layers, model.num_labels, k=model.num_layers),
                 batch, pipelined=False)


def _pipelines(model: RampModel, pipelined: bool) -> bool:
    """Whether `exit_one` takes the pipelined form: asked for, and the model decides on the device."""
    return pipelined and callable(getattr(model, "decided_steps", None))


def _exit_one_pipelined(model: DecidingModel, policy: Policy, batch: dict, stop: bool, head_layers: int):
    steps = model.decided_steps(policy, batch, head_layers)
    decided, answer = next(steps)  # ramp `head_layers`
    for layer in range(head_layers + 1, model.num_layers + 1):
        done, chosen = next(steps)  # layer `layer` queued behind ramp layer-1's flag
        if stop and np.asarray(decided):
            # the answer is ramp layer-1's, ready now: not waiting for the queued step to find
            # the flag set (it then runs while the host goes on)
            return layer - 1, np.asarray(answer)[0]
        decided, answer = done, chosen
    return model.num_layers, np.asarray(answer)[0]


def run_latency(model: RampModel, policy: Policy, split, warmup: int = 2,
                pipelined: bool = True) -> Exits:
    """Every input of `split` through `exit_one`, one at a time (`pipelined`: see there)."""
    return latency(model, policy, single_inputs(model, split), warmup, pipelined)


def latency(model: RampModel, policy: Policy, singles: list[dict], warmup: int = 2,
            pipelined: bool = True) -> Exits:
    """`run_latency` over prepared one-row batches."""
    _check(policy, model)
    one = functools.partial(exit_one, model, pipelined=pipelined)
    warm_up(lambda b: warm_latency(model, policy, b, pipelined), singles, warmup)
    layers, logits = np.zeros(len(singles), np.int64), np.zeros((len(singles), model.num_labels), np.float32)
    start = time.perf_counter()
    for i, batch in enumerate(singles):
        layers[i], logits[i] = one(policy, batch)
    return _exits(layers, logits, time.perf_counter() - start)


def run_full_latency(model: RampModel, split, warmup: int = 2) -> tuple[np.ndarray, float]:
    """The dense model (one compiled function, ramp L only), one input at a time: (logits, seconds)."""
    return full_latency(model, single_inputs(model, split), warmup)


def full_latency(model: RampModel, singles: list[dict], warmup: int = 2) -> tuple[np.ndarray, float]:
    """`run_full_latency` over prepared one-row batches."""
    warm_up(model.final_logits, singles, warmup)
    start = time.perf_counter()
    logits = np.concatenate([model.final_logits(b) for b in singles])
    return logits, time.perf_counter() - start


def warm_up(fn, batches: list[dict], warmup: int) -> None:
    """Compile every input shape in `batches` for `fn` and run each `warmup` times, so that no
    compilation lands in a timed loop over them."""
    seen = {}
    for b in batches:
        seen.setdefault(_shape(b), b)
    for b in seen.values():
        for _ in range(warmup):
            fn(b)


def _shape(batch: dict) -> tuple:
    return tuple(np.shape(v) for v in batch.values())


def _rows(batch: dict) -> int:
    return len(next(iter(batch.values())))


def _exits(layers, logits, seconds) -> Exits:
    return Exits(layers, policies.prediction(logits), logits, seconds)


# ---- batched: exited rows leave the batch ---------------------------------------------------------
@functools.lru_cache(maxsize=None)
def row_buckets(cap: int) -> tuple[int, ...]:
    """The row counts a batch of `cap` rows shrinks through: multiples of cap/8 (rounded up),
    and powers of two below the first multiple. Finer than powers of two, which would run a
    batch of 33 live rows as 64 and give back up to half of the saving."""
    step = max(1, -(-cap // 8))
    sizes = {min(cap, k * step) for k in range(1, 9)} | {1 << j for j in range(step.bit_length()) if 1 << j < step}
    return tuple(sorted(sizes))


def row_bucket(n: int, cap: int) -> int:
    return next(b for b in row_buckets(cap) if b >= n)


def exit_batch(model: RampModel, policy: Policy, batch: dict, real: int, cap: int | None = None,
               on_exit=None) -> tuple[np.ndarray, np.ndarray]:
    """The first `real` rows of `batch`: (exit layers [real], exit logits [real, C]).

    Live rows shrink through `row_buckets(cap)` (default: the batch's own row count); a batch whose
    row count is one of those buckets then only ever runs row counts among them (the service's
    dynamic batches, of any size up to `cap`). `on_exit(rows, layer, outputs)`, if given, hears of
    the rows (indices < `real`) that exit at each layer as soon as the next layer is dispatched, so
    a caller can answer them while the device computes the rest."""
    size = _rows(batch)
    cap = cap or size
    if size > cap:
        raise ValueError(f"a batch of {size} rows cannot shrink through the row buckets of {cap}")
    state = policies.init_state(policy, size)
    rows = np.arange(size)  # which original row each position of the current batch holds
    layers = np.zeros(size, np.int64)
    logits = np.zeros((size, model.num_labels), np.float32)
    steps = model.ramp_steps(batch)
    z = next(steps)
    for layer in range(1, model.num_layers + 1):  # every row has exited after layer L: the loop breaks
        z = _host(z)
        state, exits = policies.step(policy, state, z, layer)
        if layer == model.num_layers:
            exits = np.ones_like(exits)
        fresh = exits & (layers[rows] == 0) & (rows < real)
        out, first = np.unique(rows[fresh], return_index=True)  # a filler row repeats a live one: once each
        layers[out], logits[out] = layer, policies.output(policy, state, z, layer)[fresh][first]
        keep = np.flatnonzero(~exits & (rows < real))
        if keep.size:
            bucket = row_bucket(keep.size, cap)
            keep = np.concatenate([keep, np.full(bucket - keep.size, keep[0])])  # filler repeats a live row
            if bucket != len(rows) or not np.array_equal(keep, np.arange(len(rows))):
                z = steps.send(keep.astype(np.int32))  # the device keeps these rows for the next layer
                state = policies.take_rows(state, keep)
                rows = rows[keep]
            else:
                z = next(steps)
        if on_exit is not None and out.size:
            on_exit(out, layer, logits[out])  # the next layer (if any) is already on its way
        if not keep.size:
            break
    return layers[:real], logits[:real]


def warm_exit_batch(model: RampModel, batch: dict, cap: int, warmup: int = 1) -> int:
    """Compile every shape `exit_batch(..., cap=cap)` can run a batch shaped like `batch` (at least
    `cap` rows) through: each row bucket of `cap` over every layer, and each take of rows from a
    bucket into one no larger (a shrink, or the same size when a filler row replaces an exited
    one), so that none compiles in a timed run or a served request. Returns how many ran."""
    full = policies.make_policy("static", model.num_layers, model.num_labels, k=model.num_layers)
    sizes = row_buckets(cap)
    shapes = 0
    for size in sizes:
        sub = {k: v[:size] for k, v in batch.items()}
        for _ in range(warmup):
            exit_batch(model, full, sub, size, cap=cap)
        for kept in (s for s in sizes if s <= size):
            steps = model.ramp_steps(sub)
            next(steps)
            jax.block_until_ready(steps.send(np.arange(kept, dtype=np.int32)))
            steps.close()
        shapes += 1 + sum(s <= size for s in sizes)
    return shapes


def run_batched(model: RampModel, policy: Policy, split, batch_size: int = 64,
                warmup: int = 1) -> Exits:
    return batched(model, policy, _chunks(model, split, batch_size), len(split), batch_size, warmup)


def batched(model: RampModel, policy: Policy, chunks: list[tuple[np.ndarray, dict]], n: int, batch_size: int,
            warmup: int = 1) -> Exits:
    """`run_batched` over prepared `(rows, batch)` chunks of `batch_size` rows covering `n` inputs."""
    _check(policy, model)
    if warmup:
        for b in {_shape(b): b for _, b in chunks}.values():  # every input shape met below
            warm_exit_batch(model, b, batch_size, warmup)
    layers, logits = np.zeros(n, np.int64), np.zeros((n, model.num_labels), np.float32)
    start = time.perf_counter()
    for rows, batch in chunks:
        layers[rows], logits[rows] = exit_batch(model, policy, batch, len(rows))
    return _exits(layers, logits, time.perf_counter() - start)


def run_full_batched(model: RampModel, split, batch_size: int = 64, warmup: int = 1):
    """The dense model at the same batch size: (logits [N, C], seconds)."""
    return full_batched(model, _chunks(model, split, batch_size), len(split), warmup)


def full_batched(model: RampModel, chunks: list[tuple[np.ndarray, dict]], n: int, warmup: int = 1):
    """`run_full_batched` over prepared chunks."""
    warm_up(model.final_logits, [b for _, b in chunks], warmup)
    out = np.zeros((n, model.num_labels), np.float32)
    start = time.perf_counter()
    for rows, batch in chunks:
        out[rows] = model.final_logits(batch)[: len(rows)]
    return out, time.perf_counter() - start


def _chunks(model: RampModel, split, batch_size: int):
    return [(rows, model.inputs(split, filled)) for rows, filled in chunk_indices(len(split), batch_size)]


def chunk_indices(n: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`(rows, filled)` per fixed-size batch over `n` inputs in order: the rows it answers for, and
    the `batch_size` input indices it holds (the last batch filled up by repeating its first row)."""
    out = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        out.append((rows, np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])))
    return out


# ---- on device: the model's own exit loop -------------------------------------------------------
def run_on_device(model: RampModel, policy: Policy, split, batch_size: int = 1,
                  warmup: int = 1) -> Exits:
    return on_device(model, policy, _chunks(model, split, batch_size), len(split), warmup)


def on_device(model: RampModel, policy: Policy, chunks: list[tuple[np.ndarray, dict]], n: int,
              warmup: int = 1) -> Exits:
    """`run_on_device` over prepared chunks."""
    _check(policy, model)
    run = lambda b: model.device_exits(b, policy)  # noqa: E731
    warm_up(lambda b: jax.block_until_ready(run(b)), [b for _, b in chunks], warmup)
    layers, logits = np.zeros(n, np.int64), np.zeros((n, model.num_labels), np.float32)
    start = time.perf_counter()
    for rows, batch in chunks:
        exit_layer, chosen = run(batch)
        layers[rows], logits[rows] = np.asarray(exit_layer)[: len(rows)], np.asarray(chosen)[: len(rows)]
    return _exits(layers, logits, time.perf_counter() - start)


# ---- offline: every ramp's logits, once -----------------------------------------------------------
def cached_logits(model: RampModel, split, batch_size: int = 64):
    """Every ramp's logits `[L, N, C]` through the same jitted early-exit steps the live runners use;
    on a model with a learning-to-exit module `RampOutputs(logits, lte [L, N])`. A split smaller
    than `batch_size` runs as one batch of its own size."""
    return all_outputs(model, _chunks(model, split, min(batch_size, max(len(split), 1))), len(split))


def all_outputs(model: RampModel, chunks: list[tuple[np.ndarray, dict]], n: int):
    """`cached_logits` over prepared chunks covering `n` inputs."""
    out = np.zeros((model.num_layers, n, model.num_labels), np.float32)
    lte = np.zeros((model.num_layers, n), np.float32) if model.has_lte else None
    for rows, batch in chunks:
        for layer, z in enumerate(model.ramp_steps(batch)):
            logits, u = policies.split_outputs(_host(z))
            out[layer, rows] = logits[: len(rows)]
            if lte is not None:
                lte[layer, rows] = u[: len(rows)]
    return out if lte is None else RampOutputs(out, lte)
