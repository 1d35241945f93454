"""The engine: dynamic batching over the batched runner (docs/serving.md).

`Engine` gathers the inputs of concurrent requests into batches (at most `max_batch` rows, waiting
at most `max_wait_s` after the oldest) and runs each through `runners.exit_batch`, rows leaving the
batch as they exit. Every batch is padded to a token-length bucket and a row bucket
(`runners.row_buckets(max_batch)`), and `warm_up` compiles every such shape and every shrink
between them, so no request compiles. A request is answered as soon as its last input exits, while
the rest of its batch goes on. A batch only ever holds inputs of one policy, so replacing the
policy never changes or fails a request in flight.

Shadowed inputs (`submit(..., shadow=mask)`) are batched apart: their batch runs every layer,
keeping every ramp's outputs, and the policy is stepped over those on the host
(`policies.simulate`, the same exits as live stepping), so their answer is the policy's; the ramp
outputs go to `on_shadow` before the answer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time

import numpy as np

from jaxexit.exits import offline, policies, runners
from jaxexit.serving.metrics import Metrics
from jaxexit.text.model import EarlyExitModel

log = logging.getLogger(__name__)


class Ticket:
    """One request's inputs on their way through the engine."""

    def __init__(self, size: int, num_labels: int):
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.exit_layer = np.zeros(size, np.int64)
        self.output = np.zeros((size, num_labels), np.float32)
        self.left = size
        self.lock = threading.Lock()

    def done(self, positions, exit_layer, output) -> None:
        """Results for some of the request's inputs; the future resolves once all have them."""
        with self.lock:
            self.exit_layer[positions] = exit_layer
            self.output[positions] = output
            self.left -= len(positions)
            finished = self.left == 0
        if finished and not self.future.done():
            self.future.set_result((self.exit_layer, self.output))


@dataclasses.dataclass
class _Item:
    ids: list[int]
    types: list[int]
    policy: policies.Policy
    ticket: Ticket
    position: int
    arrived: float
    shadow: bool = False

    @property
    def key(self) -> tuple:
        """Inputs of one batch share it."""
        return self.policy, self.shadow


class Engine:
    """Runs inputs through the model in dynamic batches, one worker thread.

    `submit(rows, types, policy)` returns a future of `(exit_layer [n], outputs [n, C])`
    (`policies.output`: the exit ramp's logits, or the ensemble's mean). `on_shadow(policy, ramps
    [L, n, C], exit_layer [n], outputs [n, C])` hears of every batch of shadowed inputs.
    """

    def __init__(self, model: EarlyExitModel, max_batch: int = 32, max_wait_s: float = 0.002,
                 metrics: Metrics | None = None, on_shadow=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait_s}")
        self.model, self.max_batch, self.max_wait_s, self.metrics = model, max_batch, max_wait_s, metrics
        self.on_shadow = on_shadow
        self._queue: collections.deque[_Item] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="jaxexit-engine", daemon=True)
        self._thread.start()

    def submit(self, rows: list[list[int]], types: list[list[int]], policy: policies.Policy,
               shadow=None) -> concurrent.futures.Future:
        """Queue inputs under `policy`; `shadow` (bool per input) marks those also run to the end."""
        ticket = Ticket(len(rows), self.model.config.num_labels)
        now = time.perf_counter()
        shadow = [False] * len(rows) if shadow is None else [bool(s) for s in shadow]
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.extend(_Item(r, t, policy, ticket, i, now, s)
                               for i, (r, t, s) in enumerate(zip(rows, types, shadow)))
            self._cv.notify()
        return ticket.future

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    # -- the worker
    def _next_batch(self) -> list[_Item] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            first = self._queue[0]
            deadline = first.arrived + self.max_wait_s
            while not self._closed:
                ready = sum(item.key == first.key for item in self._queue)
                wait = deadline - time.perf_counter()
                if ready >= self.max_batch or wait <= 0:
                    break
                self._cv.wait(wait)
            batch, rest = [], collections.deque()
            while self._queue:
                item = self._queue.popleft()
                (batch if len(batch) < self.max_batch and item.key == first.key else rest).append(item)
            self._queue = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            by_ticket: dict[int, list[int]] = {}

            def answer(rows, layer, outputs):  # rows of this batch that exited at `layer`: answer them now
                by_ticket.clear()
                for j in rows.tolist():
                    by_ticket.setdefault(id(batch[j].ticket), []).append(j)
                for js in by_ticket.values():
                    where = np.searchsorted(rows, js)
                    batch[js[0]].ticket.done([batch[j].position for j in js], layer, outputs[where])

            try:
                if batch[0].shadow:
                    self._shadowed(batch)
                else:
                    self.run(batch[0].policy, [i.ids for i in batch], [i.types for i in batch], on_exit=answer)
            except Exception as e:  # noqa: BLE001 -- the requests get the error; the worker goes on
                log.exception("batch of %d inputs failed", len(batch))
                for item in batch:
                    if not item.ticket.future.done():
                        item.ticket.future.set_exception(e)
                continue
            if self.metrics is not None:
                self.metrics.batch_inputs.observe(len(batch))

    def _shadowed(self, batch: list[_Item]) -> None:
        policy = batch[0].policy
        ramps, layers, outputs = self.run_shadowed(policy, [i.ids for i in batch], [i.types for i in batch])
        if self.on_shadow is not None:
            try:  # before the answer, so that whoever got one finds its input in the buffer
                self.on_shadow(policy, ramps, layers, outputs)
            except Exception:  # noqa: BLE001 -- the shadow's bookkeeping must not fail the requests
                log.exception("shadow buffer")
        by_ticket: dict[int, list[int]] = {}
        for j, item in enumerate(batch):
            by_ticket.setdefault(id(item.ticket), []).append(j)
        for js in by_ticket.values():
            batch[js[0]].ticket.done([batch[j].position for j in js], layers[js], outputs[js])

    def run_shadowed(self, policy: policies.Policy, rows: list[list[int]], types: list[list[int]]):
        """One batch run to the last layer, every ramp kept: (ramp outputs [L, n, C] (`RampOutputs`
        with an LTE), exit layers [n] and outputs [n, C] of `policy` stepped over them). The padded
        shapes are `run`'s with no row leaving, which the warm-up compiled."""
        n = len(rows)
        size = runners.row_bucket(n, self.max_batch)
        filled = list(range(n)) + [0] * (size - n)
        batch = self.model.tokenizer.pad([rows[i] for i in filled], [types[i] for i in filled])
        ramps = runners.all_outputs(self.model, [(np.arange(n), batch)], n)
        layers, _ = policies.simulate(policy, ramps)
        return ramps, layers, offline.exit_outputs(policy, ramps, layers)

    def run(self, policy: policies.Policy, rows: list[list[int]], types: list[list[int]], on_exit=None):
        """One batch (at most `max_batch` rows), padded to a length bucket and a row bucket; rows
        are reported to `on_exit` as they exit (`runners.exit_batch`)."""
        n = len(rows)
        size = runners.row_bucket(n, self.max_batch)
        filled = list(range(n)) + [0] * (size - n)  # filler repeats the first row
        batch = self.model.tokenizer.pad([rows[i] for i in filled], [types[i] for i in filled])
        return runners.exit_batch(self.model, policy, batch, n, cap=self.max_batch, on_exit=on_exit)

    def warm_up(self, lengths: list[int] | None = None) -> int:
        """Compile every shape a batch can take: each row bucket at each length bucket, and each
        take of rows from a row bucket into one no larger (a shrink, or the same size when a filler
        row replaces an exited one). Returns how many shapes ran."""
        model = self.model
        lengths = lengths or list(model.tokenizer.buckets)
        shapes = 0
        for length in lengths:
            rows = [[model.tokenizer.pad_token_id] * length] * self.max_batch
            batch = model.tokenizer.pad(rows, [[0] * length] * self.max_batch, length=length)
            shapes += runners.warm_exit_batch(model, batch, self.max_batch)
        return shapes
