"""The layer engine: layer-level continuous batching (docs/serving.md, "Engines").

Every input waits in a queue per (layer, length bucket); each step runs one layer and its ramp on
rows waiting at one such queue, whichever requests they came from, then the policy's step on the
host, per policy. New inputs join at layer 1 (the step of layer 1 also runs the embeddings), while
older rows go on at deeper layers, so no layer runs half empty while new requests wait for a batch
to finish.

* A row's hidden states `[T, H]` and attention bias stay on the device, in a slot of a pool per
  length bucket (`slots` rows, plus a scratch slot for the filler rows that pad a step to its row
  bucket); a step gathers its rows' slots, runs the layer and writes them back in one jitted call
  (the pool's buffer donated, so updated in place). A row takes a slot when it runs layer 1 and
  gives it back when it exits; with every slot of a length taken, its new inputs wait.
* A row keeps its own length bucket (its tokens, padded to the smallest bucket): rows of different
  buckets never share a step, since padding a row to a longer bucket costs its whole step again
  in the layer's work, whereas a step of its own costs a dispatch.
* Steps are padded to `row_buckets(max_batch)` rows (every count up to a quarter of `max_batch`,
  then multiples of an eighth: a step here is often a few rows, and padding 5 to 8 would cost 60%
  more) and `warm_up` compiles every (row bucket, length bucket) of the two steps, so nothing
  compiles after it.
* The policy state of a row (pcee's patience counter, pabee's previous prediction, the ensemble's
  sum) travels with the row from step to step. A row is answered under the policy its request
  arrived with; rows of several policies share a layer step (the layer does not depend on the
  policy), and the policy steps per policy.
* Shadowed inputs share the steps too but never exit early: they run to layer L keeping every
  ramp's outputs, and their answer is the policy stepped over those (`policies.simulate`), as in the
  batch engine.
* Two steps are in flight: the next step (of rows not in the last one) is dispatched before the
  host runs the policy's step on the last one's outputs, so the device does not wait on the host
  (on a BERT-base-shaped model, 2 CPU cores: 0.7 ms of host work a step against 5-30 ms of layer).

The scheduling rule and the row buckets are in `jaxexit.serving.schedule`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import threading
import time

import jax
import numpy as np

from jaxexit.exits import offline, policies
from jaxexit.serving.engine import Ticket
from jaxexit.serving.metrics import Metrics
from jaxexit.serving.schedule import Candidate, pick, row_bucket, row_buckets
from jaxexit.text import exit_steps
from jaxexit.text.model import EarlyExitModel

log = logging.getLogger(__name__)


# ---- the jitted steps ------------------------------------------------------------------------------------
def _enter(cfg, hidden, bias, slots, head, layer_p, ramp_p, batch):
    """Embeddings, layer 1 and ramp 1 on new inputs, written into the pool's `slots`."""
    h, b, z = exit_steps.first_exit_step(cfg, exit_steps.PLAIN, head, layer_p, ramp_p, batch)
    return hidden.at[slots].set(h), bias.at[slots].set(b), z


def _advance(cfg, hidden, bias, slots, layer_p, ramp_p):
    """One layer and its ramp on the rows in the pool's `slots`, written back."""
    h, z = exit_steps.layer_ramp_step(cfg, layer_p, ramp_p, hidden[slots], bias[slots])
    return hidden.at[slots].set(h), z


class _Pool:
    """The device states of one length bucket's rows: hidden `[S + 1, T, H]`, bias `[S + 1, 1, 1, T]`
    (slot S is the scratch slot of filler rows)."""

    def __init__(self, shapes, slots: int, device):
        (h, b), self.slots = shapes, slots
        # committed to the parameters' device, like every step's outputs: a pool that changed from
        # uncommitted to committed after its first step would compile that step again
        self.hidden = jax.device_put(np.zeros((slots + 1, *h.shape[1:]), h.dtype), device)
        self.bias = jax.device_put(np.zeros((slots + 1, *b.shape[1:]), b.dtype), device)
        self.free = list(range(slots - 1, -1, -1))


class _Row:
    __slots__ = ("ticket", "position", "policy", "ids", "types", "length", "shadow", "arrived", "since", "slot",
                 "state", "ramps")

    def __init__(self, ticket, position, policy, ids, types, length, shadow, arrived, since, state):
        self.ticket, self.position, self.policy, self.ids, self.types = ticket, position, policy, ids, types
        self.length, self.shadow, self.arrived, self.since, self.state = length, shadow, arrived, since, state
        self.slot, self.ramps = None, []


def _host(z):
    return jax.tree_util.tree_map(np.asarray, z)


def _rows_of(z, index):
    return jax.tree_util.tree_map(lambda a: a[index], z)


class LayerEngine:
    """Runs inputs layer by layer, rows of any request sharing a layer's step; one worker thread.

    The batch engine's interface: `submit(rows, types, policy, shadow)` returns a future of
    `(exit_layer [n], outputs [n, C])`; `on_shadow(policy, ramps [L, n, C], exit_layer [n], outputs
    [n, C])` hears of shadowed inputs before their answer. `max_age`: steps a row may be passed over
    before its queue runs first (default: 4 x the number of layers). `slots`: rows past layer 1 per
    length bucket (default 4 x `max_batch`). `steps` keeps the last steps run, as (layer, length,
    rows, policies among them).
    """

    DEPTH = 2  # steps dispatched at once

    def __init__(self, model: EarlyExitModel, max_batch: int = 32, max_wait_s: float = 0.002,
                 metrics: Metrics | None = None, on_shadow=None, max_age: int | None = None,
                 slots: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait_s}")
        self.max_age = 4 * model.num_layers if max_age is None else int(max_age)
        self.slots = 4 * max_batch if slots is None else int(slots)
        if self.max_age < 1 or self.slots < max_batch:
            raise ValueError(f"max_age must be >= 1 and slots >= max_batch ({max_batch}), got {self.max_age} "
                             f"and {self.slots}")
        self.model, self.max_batch, self.max_wait_s, self.metrics = model, max_batch, max_wait_s, metrics
        self.on_shadow = on_shadow
        self.num_layers, self.num_labels = model.num_layers, model.config.num_labels
        cfg = model.config
        self._head = {"backbone": {"embeddings": model.step_params["backbone"]["embeddings"]}}
        leaf = jax.tree_util.tree_leaves(self._head)[0]
        self._device = next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else jax.devices()[0]
        self._layers = [model.layer_params(i) for i in range(self.num_layers)]
        self._ramps = [model.ramp_params(i) for i in range(self.num_layers)]
        self._enter = jax.jit(functools.partial(_enter, cfg), donate_argnums=(0, 1))
        self._advance = jax.jit(functools.partial(_advance, cfg), donate_argnums=(0,))
        self._embed_shapes = functools.lru_cache(maxsize=None)(self._shapes)
        self._pools: dict[int, _Pool] = {}
        self._queues: dict[tuple[int, int], collections.deque[_Row]] = {}
        self._count = 0  # steps run
        self._flight: collections.deque = collections.deque()  # (queue, rows, outputs) not yet decided
        self.steps: collections.deque[tuple[int, int, int, int]] = collections.deque(maxlen=10000)
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="jaxexit-layer-engine", daemon=True)
        self._thread.start()

    def _shapes(self, length: int):
        dummy = {k: jax.ShapeDtypeStruct((1, length), np.int32)
                 for k in ("input_ids", "token_type_ids", "attention_mask")}
        return jax.eval_shape(functools.partial(exit_steps.embed, self.model.config), self._head, dummy)

    def _pool(self, length: int) -> _Pool:
        if length not in self._pools:
            self._pools[length] = _Pool(self._embed_shapes(length), self.slots, self._device)
        return self._pools[length]

    # -- requests
    def submit(self, rows: list[list[int]], types: list[list[int]], policy: policies.Policy,
               shadow=None) -> concurrent.futures.Future:
        """Queue inputs under `policy` at layer 1; `shadow` (bool per input) marks those also run to
        the end."""
        ticket = Ticket(len(rows), self.num_labels)
        now = time.perf_counter()
        shadow = [False] * len(rows) if shadow is None else [bool(s) for s in shadow]
        tokenizer = self.model.tokenizer
        state = {k: v[0] for k, v in policies.init_state(policy, 1).items()}  # each row's, shared until it steps
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            for i, (r, t, s) in enumerate(zip(rows, types, shadow)):
                length = tokenizer.bucket_length(len(r))
                row = _Row(ticket, i, policy, r, t, length, s, now, self._count, state)
                self._queues.setdefault((1, length), collections.deque()).append(row)
            self._cv.notify()
        return ticket.future

    def close(self) -> None:
        """Stop once every queued input is answered."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    # -- choosing a step (under the lock)
    def _candidates(self) -> list[Candidate]:
        out = []
        for (layer, length), queue in self._queues.items():
            n = len(queue) if layer > 1 else min(len(queue), len(self._pool(length).free))
            if n:
                out.append(Candidate(layer, length, n, self._count - queue[0].since))
        return out

    def _choose(self) -> tuple[list[_Row] | None, Candidate | None, float | None]:
        """(rows, their queue) of the next step, or (None, None, seconds to wait; None: until told)."""
        candidates = self._candidates()
        if not candidates:
            return None, None, None
        if all(c.layer == 1 for c in candidates) and max(c.rows for c in candidates) < self.max_batch \
                and not self._closed:
            oldest = min(self._queues[(1, c.length)][0].arrived for c in candidates)
            wait = oldest + self.max_wait_s - time.perf_counter()
            if wait > 0:
                return None, None, wait
        choice = pick(candidates, self.max_batch, self.max_age)
        n = min(choice.rows, self.max_batch)
        queue = self._queues[(choice.layer, choice.length)]
        rows = [queue.popleft() for _ in range(n)]
        if choice.layer == 1:
            pool = self._pool(choice.length)
            for row in rows:
                row.slot = pool.free.pop()
        self._count += 1
        return rows, choice, None

    def _next(self, pending: list, block: bool) -> tuple[list[_Row], Candidate] | None:
        """The next step's rows and queue; None when none can run now and `block` is false, or
        when the engine is closed and drained. Answers `pending` before waiting for work."""
        while True:
            with self._cv:
                rows, choice, wait = self._choose()
                if rows is None and not block:
                    return None
                if rows is None and not pending:
                    if self._closed and not any(self._queues.values()):
                        return None
                    self._cv.wait(wait)
                    continue
            if rows is not None:
                return rows, choice
            self._deliver(pending)

    # -- the worker
    def _loop(self) -> None:
        """Keeps up to `DEPTH` steps dispatched: the next step (of rows not in flight) is queued on
        the device before the host decides on the last one, so the device does not wait for the
        host's policy step; a step's answers are given once the next is dispatched."""
        pending: list = []
        while True:
            while len(self._flight) < self.DEPTH:
                got = self._next(pending, block=not self._flight)
                if got is None:
                    break
                rows, queue = self._alive(got[0]), got[1]
                if not rows:
                    continue
                try:
                    self._flight.append((queue, rows, self._dispatch(queue.layer, queue.length, rows)))
                except Exception as e:  # noqa: BLE001 -- the requests get the error; the worker goes on
                    log.exception("a step of %d rows at layer %d failed", len(rows), queue.layer)
                    self._fail(queue.length, rows, e)
            if not self._flight:  # _next, blocking, found the engine closed and drained
                self._deliver(pending)
                return
            self._deliver(pending)  # while the device computes
            queue, rows, z = self._flight.popleft()
            try:
                pending = self._decide(queue.layer, rows, _host(z))
            except Exception as e:  # noqa: BLE001
                log.exception("a step of %d rows at layer %d failed", len(rows), queue.layer)
                pending = []
                self._fail(queue.length, rows, e)

    def _alive(self, rows: list[_Row]) -> list[_Row]:
        """`rows` but those of requests that already failed (their slots given back)."""
        dead = [r for r in rows if r.ticket.future.done()]
        if dead:
            self._release(dead)
        return [r for r in rows if not r.ticket.future.done()]

    def _release(self, rows: list[_Row]) -> None:
        with self._cv:
            for r in rows:
                if r.slot is not None:
                    self._pools[r.length].free.append(r.slot)
                    r.slot = None
            self._cv.notify()

    def _dispatch(self, layer: int, length: int, rows: list[_Row]):
        """Queue the step on the device: ramp `layer`'s outputs of `rows` (padded to a row bucket)."""
        n = len(rows)
        size = row_bucket(n, self.max_batch)
        pool = self._pools[length]
        slots = np.full(size, pool.slots, np.int32)  # filler rows: the scratch slot
        slots[:n] = [r.slot for r in rows]
        self.steps.append((layer, length, n, len({r.policy for r in rows})))
        if layer == 1:
            filled = rows + [rows[0]] * (size - n)
            batch = self.model.tokenizer.pad([r.ids for r in filled], [r.types for r in filled], length=length)
            pool.hidden, pool.bias, z = self._enter(pool.hidden, pool.bias, slots, self._head, self._layers[0],
                                                    self._ramps[0], batch)
            if self.metrics is not None:
                self.metrics.batch_inputs.observe(n)
            return z
        pool.hidden, z = self._advance(pool.hidden, pool.bias, slots, self._layers[layer - 1], self._ramps[layer - 1])
        return z

    def _decide(self, layer: int, rows: list[_Row], z) -> list:
        """The policy's step on ramp `layer`'s outputs `z` of `rows`, per policy: rows that exit are
        answered (returned as pending answers), the others queue at the next layer."""
        L, n = self.num_layers, len(rows)
        exits = np.zeros(n, bool)
        outputs = np.zeros((n, self.num_labels), np.float32)
        groups: dict[policies.Policy, list[int]] = {}
        shadowed = []
        for j, row in enumerate(rows):
            if row.shadow:
                row.ramps.append(_rows_of(z, j))
                if layer == L:
                    shadowed.append(j)
            else:
                groups.setdefault(row.policy, []).append(j)
        for policy, js in groups.items():
            index = np.asarray(js)
            zg = _rows_of(z, index)
            keys = rows[js[0]].state.keys()
            state = {k: np.stack([rows[j].state[k] for j in js]) for k in keys}
            state, fired = policies.step(policy, state, zg, layer)
            exits[index] = fired | (layer == L)
            outputs[index] = policies.output(policy, state, zg, layer)
            for i, j in enumerate(js):
                rows[j].state = {k: v[i] for k, v in state.items()}
        answers = self._shadow_answers([rows[j] for j in shadowed])
        exits[shadowed] = True
        by_ticket: dict[int, list[int]] = {}
        for j in np.flatnonzero(exits & np.array([not r.shadow for r in rows])).tolist():
            by_ticket.setdefault(id(rows[j].ticket), []).append(j)
        for js in by_ticket.values():
            answers.append((rows[js[0]].ticket, [rows[j].position for j in js], layer, outputs[js]))
        with self._cv:
            for j, row in enumerate(rows):
                if exits[j]:
                    self._pools[row.length].free.append(row.slot)
                    row.slot = None
                else:
                    row.since = self._count
                    self._queues.setdefault((layer + 1, row.length), collections.deque()).append(row)
        return answers

    def _shadow_answers(self, rows: list[_Row]) -> list:
        """Shadowed rows that ran layer L: the policy stepped over their ramps (`on_shadow` hears of
        them first); their answers."""
        answers = []
        groups: dict[policies.Policy, list[_Row]] = {}
        for row in rows:
            groups.setdefault(row.policy, []).append(row)
        for policy, group in groups.items():
            per_row = [jax.tree_util.tree_map(lambda *xs: np.stack(xs), *r.ramps) for r in group]  # [L, C] each
            ramps = jax.tree_util.tree_map(lambda *xs: np.stack(xs, axis=1), *per_row)  # [L, n, C]
            layers, _ = policies.simulate(policy, ramps)
            outputs = offline.exit_outputs(policy, ramps, layers)
            if self.on_shadow is not None:
                try:  # before the answer, so that whoever got one finds its input in the buffer
                    self.on_shadow(policy, ramps, layers, outputs)
                except Exception:  # noqa: BLE001 -- the shadow's bookkeeping must not fail the requests
                    log.exception("shadow buffer")
            for i, row in enumerate(group):
                row.ramps = []
                answers.append((row.ticket, [row.position], layers[i:i + 1], outputs[i:i + 1]))
        return answers

    @staticmethod
    def _deliver(answers: list) -> None:
        for ticket, positions, layer, outputs in answers:
            ticket.done(positions, layer, outputs)
        answers.clear()

    def _fail(self, length: int, rows: list[_Row], error: Exception) -> None:
        """A step failed: its rows' requests get the error. Should the pool have gone with it (a
        donated buffer), every row in the pool fails too and the pool starts anew."""
        pool = self._pools.get(length)
        lost = pool is not None and (pool.hidden.is_deleted() or pool.bias.is_deleted())
        with self._cv:
            if lost:
                for key in [k for k in self._queues if k[1] == length and k[0] > 1]:
                    rows = rows + list(self._queues.pop(key))
                for step in [f for f in self._flight if f[0].length == length]:  # they read the lost pool
                    self._flight.remove(step)
                    rows = rows + step[1]
                self._pools.pop(length)
            elif pool is not None:
                for r in rows:
                    if r.slot is not None:
                        pool.free.append(r.slot)
            for r in rows:
                r.slot = None
            self._cv.notify()
        for r in rows:
            if not r.ticket.future.done():
                r.ticket.future.set_exception(error)

    def warm_up(self, lengths: list[int] | None = None) -> int:
        """Compile both steps at every row bucket and length bucket (on the scratch slot only), before
        any input is submitted. Returns how many shapes ran."""
        tokenizer = self.model.tokenizer
        shapes = 0
        for length in lengths or list(tokenizer.buckets):
            with self._cv:
                pool = self._pool(length)
            for size in row_buckets(self.max_batch):
                slots = np.full(size, pool.slots, np.int32)
                batch = tokenizer.pad([[tokenizer.pad_token_id] * length] * size, [[0] * length] * size, length=length)
                with self._cv:
                    pool.hidden, pool.bias, z = self._enter(pool.hidden, pool.bias, slots, self._head,
                                                            self._layers[0], self._ramps[0], batch)
                    pool.hidden, z = self._advance(pool.hidden, pool.bias, slots, self._layers[-1], self._ramps[-1])
                    jax.block_until_ready(z)
                shapes += 2
        return shapes
