"""The early-exit service's engine: dynamic batching over the batched runner, the active policy
(explicit, or a target saving mapped through a calibration table), a latency controller, and
Prometheus metrics. `jaxexit.serving.app` puts HTTP in front of it; `infer/serve.py` starts both.

* `Engine` gathers the inputs of concurrent requests into batches (at most `max_batch` rows,
  waiting at most `max_wait_s` after the oldest) and runs each through `runners.exit_batch`, rows
  leaving the batch as they exit. Every batch is padded to a token-length bucket and a row bucket
  (`runners.row_buckets(max_batch)`), and `warm_up` compiles every such shape and every shrink
  between them, so no request compiles. A request is answered as soon as its last input exits,
  while the rest of its batch goes on.
* A request is answered with the policy that was active when it arrived: a batch only ever holds
  inputs of one policy, so replacing the policy never changes or fails a request in flight.
* `CalibrationTable` holds every ramp's outputs on a labelled split (computed once, stored in the
  run directory) and maps a target saving to the best setting of a policy with at least that
  saving on it (`offline.choose`, the rule of `infer/run.py --target-saving`).
* `Controller` watches the recent p95 latency and moves the target saving up when it exceeds the
  objective and back down when there is room, within bounds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import threading
import time

import jax
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jaxexit.text import glue, metrics
from jaxexit.exits import offline, policies, runners
from jaxexit.text.model import EarlyExitModel
from jaxexit.training.checkpoint import RunDir
from jaxexit.exits.types import RampOutputs

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the service refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# ---- calibration table -----------------------------------------------------------------------------
class CalibrationTable:
    """Every ramp's outputs on a labelled split, and per policy its sweep rows there.

    `lookup(label, target, fixed)` is the setting of policy `label` (its parameters in `fixed`
    held) with the best score among those whose saving on the split is >= `target`.
    """

    def __init__(self, outputs, labels: np.ndarray, task: glue.Task, source: str):
        self.outputs, self.labels, self.task, self.source = outputs, np.asarray(labels), task, source
        logits, lte = offline.parts(outputs)
        self.num_layers, self.size, self.num_labels = logits.shape
        self.has_lte = lte is not None
        self.full_score = offline.full_score(outputs, self.labels, metrics.primary_scorer(task))
        self._rows: dict[str, list[dict]] = {}

    def rows(self, label: str) -> list[dict]:
        """Policy `label`'s default grid evaluated on the split (sweep rows plus `drop`), memoised."""
        if label not in self._rows:
            offline.default_grid(label, self.num_layers, self.num_labels)  # refuses what cannot apply
            rows = offline.sweep(self.outputs, self.labels, metrics.primary_scorer(self.task), {label: None})
            self._rows[label] = [offline.with_drop(r, self.full_score) for r in rows]
        return self._rows[label]

    def _matching(self, label: str, fixed: dict) -> list[dict]:
        rows = [r for r in self.rows(label) if all(r["params"].get(k) == v for k, v in fixed.items())]
        if not rows:
            given = ", ".join(f"{k}={v}" for k, v in fixed.items())
            raise RequestError(f"the calibration table has no {label} setting with {given}: fix only values in "
                               f"{label}'s grid (see GET /v1/policy), or none")
        return rows

    def max_saving(self, label: str, fixed: dict | None = None) -> float:
        return max(r["saving"] for r in self._matching(label, dict(fixed or {})))

    def lookup(self, label: str, target: float, fixed: dict | None = None) -> tuple[policies.Policy, dict]:
        """(policy, its row on the split): the best score with saving >= `target`."""
        fixed = dict(fixed or {})
        rows = self._matching(label, fixed)
        reach = max(r["saving"] for r in rows)
        if target > reach + 1e-9:
            raise RequestError(f"target_saving {target} is beyond what {label} reaches on {self.source} "
                               f"({reach:.3f}); ask for at most that")
        index, _ = offline.choose(rows, target_saving=target, name=label)
        row = rows[index]
        return policies.make_policy(label, self.num_layers, self.num_labels, **row["params"]), row

    def summary(self) -> dict:
        return {"split": self.source, "inputs": self.size, "metric": metrics.primary_metric(self.task),
                "full_score": self.full_score}


def _fingerprint(run: RunDir) -> str:
    """Changes whenever the run's final parameters are rewritten."""
    h = hashlib.sha256()
    for path in sorted((run.path / "model").rglob("*")):
        if path.is_file():
            stat = path.stat()
            h.update(f"{path.relative_to(run.path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def load_table(run: RunDir, model: EarlyExitModel, task: glue.Task, split_name: str, data_dir: str | None,
               batch_size: int = 64) -> CalibrationTable:
    """The calibration table of `run` on its labelled split `split_name`: the ramp outputs are read
    from `<run>/serving/` when they were computed from the run's current parameters, else computed
    once (one offline pass) and stored there."""
    from jaxexit.cli.infer import load_inputs

    cache = run.path / "serving" / f"outputs-{split_name}.npz"
    fingerprint = _fingerprint(run)
    if cache.is_file():
        with np.load(cache) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("fingerprint") == fingerprint and meta.get("data_dir") == data_dir:
                outputs = data["logits"] if "lte" not in data else RampOutputs(data["logits"], data["lte"])
                log.info("calibration table: ramp outputs of %s read from %s", split_name, cache)
                return CalibrationTable(outputs, data["labels"], task, f"{split_name} ({len(data['labels'])} inputs)")
    split, _ = load_inputs(run, model, task, split_name, data_dir)
    if not split.labelled:
        raise ValueError(f"{task.tsv_dir} {split_name} has no labels: a calibration table needs a labelled split")
    log.info("calibration table: one pass over %s %s (%d inputs) ...", task.tsv_dir, split_name, len(split))
    outputs = runners.cached_logits(model, split, batch_size)
    logits, lte = offline.parts(outputs)
    arrays = {"logits": logits, "labels": split.labels,
              "meta": np.array(json.dumps({"fingerprint": fingerprint, "data_dir": data_dir}))}
    if lte is not None:
        arrays["lte"] = lte
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(cache)  # atomic: a half-written cache is never read
    log.info("calibration table: stored in %s", cache)
    return CalibrationTable(outputs, split.labels, task, f"{split_name} ({len(split)} inputs)")


# ---- metrics ----------------------------------------------------------------------------------------
class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self, num_layers: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("jaxexit_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.errors = Counter("jaxexit_request_errors", "HTTP requests answered with a 4xx or 5xx",
                              ["endpoint", "code"], registry=r)
        self.latency = Histogram("jaxexit_request_latency_seconds", "POST /v1/classify latency, arrival to answer",
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.inputs = Counter("jaxexit_inputs", "inputs classified", registry=r)
        self.batch_inputs = Histogram("jaxexit_batch_inputs", "inputs per model batch",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.exit_layer = Histogram("jaxexit_exit_layer", "exit layer per input",
                                    buckets=tuple(range(1, num_layers + 1)), registry=r)
        self.target_saving = Gauge("jaxexit_target_saving", "active target saving (NaN: explicit thresholds)",
                                   registry=r)
        self.expected_saving = Gauge("jaxexit_expected_saving",
                                     "saving of the active policy on the calibration split (NaN: no table)", registry=r)
        self.realised_saving = Gauge("jaxexit_realised_saving", "1 - avg exit layer / L over the last inputs",
                                     registry=r)
        self.p95 = Gauge("jaxexit_latency_p95_seconds", "p95 request latency over the controller's window",
                         registry=r)
        self.policy_changes = Counter("jaxexit_policy_changes", "active policy replaced", ["source"], registry=r)
        self.compiles = Counter("jaxexit_compiles_after_warmup", "XLA compilations after the warm-up", registry=r)
        self.target_saving.set(math.nan)
        self.expected_saving.set(math.nan)
        self.p95.set(math.nan)
        self.realised_saving.set(math.nan)


# ---- the engine: dynamic batches -----------------------------------------------------------------------
class _Ticket:
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
    ticket: _Ticket
    position: int
    arrived: float


class Engine:
    """Runs inputs through the model in dynamic batches, one worker thread.

    `submit(rows, types, policy)` returns a future of `(exit_layer [n], outputs [n, C])`
    (`policies.output`: the exit ramp's logits, or the ensemble's mean).
    """

    def __init__(self, model: EarlyExitModel, max_batch: int = 32, max_wait_s: float = 0.002,
                 metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait_s}")
        self.model, self.max_batch, self.max_wait_s, self.metrics = model, max_batch, max_wait_s, metrics
        self._queue: collections.deque[_Item] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="jaxexit-engine", daemon=True)
        self._thread.start()

    def submit(self, rows: list[list[int]], types: list[list[int]], policy: policies.Policy
               ) -> concurrent.futures.Future:
        ticket = _Ticket(len(rows), self.model.config.num_labels)
        now = time.perf_counter()
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.extend(_Item(r, t, policy, ticket, i, now) for i, (r, t) in enumerate(zip(rows, types)))
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
                ready = sum(item.policy == first.policy for item in self._queue)
                wait = deadline - time.perf_counter()
                if ready >= self.max_batch or wait <= 0:
                    break
                self._cv.wait(wait)
            batch, rest = [], collections.deque()
            while self._queue:
                item = self._queue.popleft()
                (batch if len(batch) < self.max_batch and item.policy == first.policy else rest).append(item)
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
                self.run(batch[0].policy, [i.ids for i in batch], [i.types for i in batch], on_exit=answer)
            except Exception as e:  # noqa: BLE001 -- the requests get the error; the worker goes on
                log.exception("batch of %d inputs failed", len(batch))
                for item in batch:
                    if not item.ticket.future.done():
                        item.ticket.future.set_exception(e)
                continue
            if self.metrics is not None:
                self.metrics.batch_inputs.observe(len(batch))

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


# ---- the policy the service runs ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ActivePolicy:
    """The policy new requests get; with `target` set, it came from the calibration table."""

    policy: policies.Policy
    target: float | None = None
    fixed: tuple = ()
    row: dict | None = None  # the table row of the policy (calibration split)
    source: str = "start"

    def describe(self) -> dict:
        out = {**self.policy.as_dict(), "target_saving": self.target}
        if self.fixed:
            out["fixed"] = dict(self.fixed)
        if self.row is not None:
            out["calibration"] = {"saving": self.row["saving"], "score": self.row["score"], "drop": self.row["drop"]}
        return out


POLICY_KEYS = ("policy", "confidence", "ensemble", "target_saving", *policies.FLOAT_PARAMS, "patience", "k")


class Service:
    """The model, its task, the active policy, the engine, the controller and the metrics."""

    def __init__(self, model: EarlyExitModel, task: glue.Task, table: CalibrationTable | None = None, *,
                 max_batch: int = 32, max_wait_s: float = 0.002, max_inputs: int = 256, window: int = 2000,
                 source: str = ""):
        self.model, self.task, self.table, self.max_inputs, self.source = model, task, table, max_inputs, source
        self.metrics = Metrics(model.num_layers)
        self.engine = Engine(model, max_batch, max_wait_s, self.metrics)
        self._active = ActivePolicy(policies.make_policy("static", model.num_layers, model.config.num_labels,
                                                         k=model.num_layers))
        self._lock = threading.Lock()
        self._exits: collections.deque[int] = collections.deque(maxlen=window)
        self._exit_sum = 0  # of self._exits, kept as inputs come and go
        self._latencies: collections.deque[tuple[float, float]] = collections.deque(maxlen=20000)
        self.controller: Controller | None = None
        self._warm = False
        jax.monitoring.register_event_duration_secs_listener(self._on_compile)

    def _on_compile(self, event: str, duration: float, **_) -> None:
        if self._warm and event == "/jax/core/compile/backend_compile_duration":
            self.metrics.compiles.inc()

    def warm_up(self) -> int:
        shapes = self.engine.warm_up()
        self._warm = True
        return shapes

    def close(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        self.engine.close()
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)  # jax >= 0.4.36
        if unregister is not None:
            unregister(self._on_compile)

    # -- the policy
    @property
    def active(self) -> ActivePolicy:
        return self._active

    def set_policy(self, spec: dict, source: str = "api") -> ActivePolicy:
        """Replace the active policy: `{"policy": name, **params}` (with `confidence`, `ensemble`)
        or `{"target_saving": x}` (optionally with `policy` and parameters to hold). Raises
        RequestError naming what is wrong."""
        active = self.resolve(spec, source)
        with self._lock:
            self._active = active
        self.metrics.policy_changes.labels(source).inc()
        self.metrics.target_saving.set(math.nan if active.target is None else active.target)
        self.metrics.expected_saving.set(math.nan if active.row is None else active.row["saving"])
        log.info("policy (%s): %s%s", source, active.policy,
                 "" if active.target is None else f" for target saving {active.target}")
        return active

    def resolve(self, spec: dict, source: str = "api") -> ActivePolicy:
        if not isinstance(spec, dict):
            raise RequestError("the policy must be a JSON object")
        unknown = sorted(set(spec) - set(POLICY_KEYS))
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(unknown)}; a policy takes {', '.join(POLICY_KEYS)}")
        spec = {k: v for k, v in spec.items() if v is not None}
        L, C = self.model.num_layers, self.model.config.num_labels
        name = spec.get("policy")
        if name is not None and not isinstance(name, str):
            raise RequestError(f"policy must be a string, got {name!r}")
        confidence, ensemble = spec.get("confidence", "entropy"), spec.get("ensemble", False)
        if not isinstance(ensemble, bool):
            raise RequestError(f"ensemble must be true or false, got {ensemble!r}")
        params = {k: v for k, v in spec.items() if k not in ("policy", "confidence", "ensemble", "target_saving")}
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"{key} must be a number, got {value!r}")
        try:
            if "target_saving" in spec:
                return self._from_table(spec["target_saving"], name or "pcee", confidence, ensemble, params, source)
            if name is None:
                raise RequestError("give a policy (e.g. {\"policy\": \"pcee\", \"patience\": 2, \"tau\": 0.3}) "
                                   "or a target_saving")
            policy = policies.make_policy(policies.compose_label(name, confidence, ensemble), L, C, **params)
        except RequestError:
            raise
        except (ValueError, TypeError) as e:
            raise RequestError(str(e)) from None
        if policy.needs_lte and not self.model.config.lte:
            raise RequestError(policies.NEEDS_LTE.format(policy=policy.label))
        return ActivePolicy(policy, source=source)

    def _from_table(self, target, name, confidence, ensemble, fixed, source) -> ActivePolicy:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
            raise RequestError(f"target_saving must be a number in [0, 1), got {target!r}")
        if self.table is None:
            raise RequestError("this service has no calibration table (start it with a labelled split): "
                               "give explicit thresholds instead of a target_saving")
        label = policies.compose_label(name, confidence, ensemble)
        policies.parse_label(label)
        policy, row = self.table.lookup(label, float(target), fixed)
        if policy.needs_lte and not self.model.config.lte:
            raise RequestError(policies.NEEDS_LTE.format(policy=policy.label))
        return ActivePolicy(policy, float(target), tuple(sorted(fixed.items())), row, source)

    def describe_policy(self) -> dict:
        """The active policy, what the calibration table offers (per policy: the largest target
        saving it can meet), the realised saving and the controller's settings."""
        config = self.model.config
        out = {"active": self._active.describe(), "task": self.task.tsv_dir, "num_layers": self.model.num_layers,
               "policies": list(offline.applicable(config.num_labels, config.lte)),
               "realised_saving": self.realised_saving()}
        if self.table is not None:
            out["table"] = {**self.table.summary(), "max_saving": {
                label: self.table.max_saving(label) for label in offline.applicable(config.num_labels, config.lte)}}
        if self.controller is not None:
            out["controller"] = self.controller.describe()
        return out

    # -- requests
    def check_inputs(self, texts, pairs) -> tuple[list[str], list[str] | None]:
        """The request's inputs as (first sentences, second sentences or None), or RequestError."""
        if (texts is None) == (pairs is None):
            raise RequestError('give exactly one of "texts" and "pairs"')
        kind = "texts" if texts is not None else "pairs"
        values = texts if texts is not None else pairs
        if not values:
            raise RequestError(f"{kind} is empty: nothing to classify")
        if len(values) > self.max_inputs:
            raise RequestError(f"{len(values)} inputs in one request; this service takes at most {self.max_inputs} "
                               "(--max-inputs)", status=413)
        if self.task.is_pair and texts is not None:
            raise RequestError(f"{self.task.tsv_dir} classifies sentence pairs: send \"pairs\": [[a, b], ...]")
        if not self.task.is_pair and pairs is not None:
            raise RequestError(f"{self.task.tsv_dir} classifies single sentences: send \"texts\": [...]")
        if texts is not None:
            return list(texts), None
        return [a for a, _ in pairs], [b for _, b in pairs]

    def submit(self, texts, pairs=None) -> tuple[concurrent.futures.Future, ActivePolicy, float]:
        """Tokenise and queue a request's inputs under the policy active now: (future of
        `(exit_layer, outputs)`, that policy, arrival time)."""
        arrived = time.perf_counter()
        first, second = self.check_inputs(texts, pairs)
        rows, types = self.model.tokenizer.encode(first, second)
        active = self._active  # the policy of this request, whatever happens after
        return self.engine.submit(rows, types, active.policy), active, arrived

    def answer(self, active: ActivePolicy, exit_layer: np.ndarray, outputs: np.ndarray, arrived: float) -> dict:
        """The response body, and the request's metrics."""
        policy = active.policy
        results = []
        for m, z in zip(exit_layer.tolist(), outputs):
            if self.task.is_regression:
                results.append({"score": float(z[0]), "exit_layer": m})
                continue
            probs = z if policy.ensemble else np.exp(policies.log_softmax(z[None].astype(np.float64))[0])
            label_id = int(np.argmax(z))
            results.append({"label": self.task.label_names[label_id], "label_id": label_id,
                            "probabilities": [float(p) for p in probs], "exit_layer": m})
        now = time.perf_counter()
        with self._lock:
            for m in exit_layer.tolist():
                if len(self._exits) == self._exits.maxlen:
                    self._exit_sum -= self._exits[0]  # the oldest leaves the window
                self._exits.append(m)
                self._exit_sum += m
            self._latencies.append((now, now - arrived))
        self.metrics.latency.observe(now - arrived)
        self.metrics.inputs.inc(len(results))
        for m in exit_layer.tolist():
            self.metrics.exit_layer.observe(m)
        self.metrics.realised_saving.set(self.realised_saving())
        return {"results": results, "policy": active.describe(), "num_layers": self.model.num_layers}

    def realised_saving(self) -> float | None:
        with self._lock:
            if not self._exits:
                return None
            return 1.0 - self._exit_sum / len(self._exits) / self.model.num_layers

    def recent_latencies(self, seconds: float) -> np.ndarray:
        since = time.perf_counter() - seconds
        with self._lock:
            return np.array([lat for t, lat in self._latencies if t >= since])


# ---- adaptive speed --------------------------------------------------------------------------------------
class Controller:
    """Moves the target saving with the load: every `interval_s`, the p95 latency of the requests
    answered in the last `window_s` is compared with the objective `slo_s`; above it, the target
    goes up by `step` (at most `max_saving`); below `room * slo_s`, down by `step` (at least
    `min_saving`). Each change goes through the calibration table, is logged, and shows in
    `/metrics` (`jaxexit_target_saving`, `jaxexit_policy_changes{source="controller"}`). It acts
    only while the active policy is a target saving (explicit thresholds switch it off until a
    target is set again)."""

    def __init__(self, service: Service, slo_s: float, min_saving: float, max_saving: float, *,
                 step: float = 0.05, interval_s: float = 1.0, window_s: float = 5.0, room: float = 0.6,
                 min_samples: int = 10):
        if not 0.0 <= min_saving <= max_saving < 1.0:
            raise ValueError(f"need 0 <= min saving <= max saving < 1, got {min_saving} and {max_saving}")
        if slo_s <= 0 or step <= 0 or interval_s <= 0 or window_s <= 0:
            raise ValueError("the latency objective, step, interval and window must be > 0")
        self.service, self.slo_s, self.min_saving, self.max_saving = service, slo_s, min_saving, max_saving
        self.step, self.interval_s, self.window_s, self.room, self.min_samples = step, interval_s, window_s, room, min_samples
        self.changes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jaxexit-controller", daemon=True)

    def start(self) -> "Controller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def describe(self) -> dict:
        return {"latency_slo_ms": self.slo_s * 1e3, "min_saving": self.min_saving, "max_saving": self.max_saving,
                "step": self.step, "interval_s": self.interval_s, "window_s": self.window_s, "changes": self.changes}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 -- a failed adjustment must not stop the controller
                log.exception("latency controller")

    def tick(self) -> float | None:
        """One decision; returns the new target when it changed."""
        latencies = self.service.recent_latencies(self.window_s)
        if len(latencies) < self.min_samples:
            return None
        p95 = float(np.percentile(latencies, 95))
        self.service.metrics.p95.set(p95)
        active = self.service.active
        if active.target is None:
            return None
        target = active.target
        if p95 > self.slo_s:
            target = min(self.max_saving, round(target + self.step, 6))
        elif p95 < self.room * self.slo_s:
            target = max(self.min_saving, round(target - self.step, 6))
        if target == active.target:
            return None
        spec = {"policy": active.policy.name, "confidence": active.policy.confidence,
                "ensemble": active.policy.ensemble, "target_saving": target, **dict(active.fixed)}
        self.service.set_policy(spec, source="controller")
        self.changes += 1
        log.info("controller: p95 %.1f ms vs objective %.1f ms -> target saving %.2f",
                 p95 * 1e3, self.slo_s * 1e3, target)
        return target
