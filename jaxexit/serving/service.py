"""The service: the model, its task, the active policy (explicit, a target saving mapped through
the calibration table, or a risk target certified on the table's split or on shadow traffic), the
engine, the shadow buffer, the latency controller and the metrics (`Service`); and its
assembly from a run or an exported directory, warmed up (`build_service`), which `jaxexit-serve`
puts behind HTTP (`jaxexit.serving.app`). docs/serving.md describes the service.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxexit.exits import offline, policies, risk
from jaxexit.serving.controller import Controller
from jaxexit.serving.engine import Engine
from jaxexit.serving.errors import RequestError
from jaxexit.serving.layer_engine import LayerEngine
from jaxexit.serving.metrics import Metrics
from jaxexit.serving.shadow import RISK_KEYS, RiskTarget, ShadowBuffer, served_differs
from jaxexit.serving.table import CalibrationTable, export_table, load_table
from jaxexit.text import checkpoints, glue
from jaxexit.text.model import EarlyExitModel

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ActivePolicy:
    """The policy new requests get; with `target` set, it came from the calibration table; with
    `risk_target` set, from its `certificate` on `certified_on` (the table's split, or the shadow
    buffer)."""

    policy: policies.Policy
    target: float | None = None
    fixed: tuple = ()
    row: dict | None = None  # the table row of the policy (calibration split)
    source: str = "start"
    risk_target: RiskTarget | None = None
    certificate: risk.Certificate | None = None
    certified_on: str = ""

    def describe(self) -> dict:
        out = {**self.policy.as_dict(), "target_saving": self.target}
        if self.fixed:
            out["fixed"] = dict(self.fixed)
        if self.row is not None:
            out["calibration"] = {"saving": self.row["saving"], "score": self.row["score"], "drop": self.row["drop"]}
        if self.certificate is not None:
            out["risk_target"] = self.risk_target.as_dict()
            out["certificate"] = {**self.certificate.as_dict(), "calibrated_on": self.certified_on}
        return out


# batch: a batch at a time, rows leaving it as they exit (engine.py); layer: layer-level continuous
# batching, rows of any request meeting at each layer (layer_engine.py). docs/serving.md, "Engines".
ENGINES = {"batch": Engine, "layer": LayerEngine}

POLICY_KEYS = ("policy", "confidence", "ensemble", "target_saving", *RISK_KEYS, *policies.PARAM_NAMES)


class Service:
    """The model, its task, the active policy, the engine, the controller and the metrics."""

    def __init__(self, model: EarlyExitModel, task: glue.Task, table: CalibrationTable | None = None, *,
                 max_batch: int = 32, max_wait_s: float = 0.002, max_inputs: int = 256, window: int = 2000,
                 source: str = "", shadow_rate: float = 0.0, shadow_buffer: int = 5000, shadow_seed: int = 0,
                 engine: str = "batch"):
        self.model, self.task, self.table, self.max_inputs, self.source = model, task, table, max_inputs, source
        self.metrics = Metrics(model.num_layers)
        self.shadow = ShadowBuffer(shadow_rate, shadow_buffer, shadow_seed)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.engine = ENGINES[engine](model, max_batch, max_wait_s, self.metrics, on_shadow=self._on_shadow)
        self._active = ActivePolicy(policies.make_policy("static", model.num_layers, model.config.num_labels,
                                                         k=model.num_layers))
        self._lock = threading.Lock()
        self._changing = threading.Lock()  # one policy change at a time (a certification takes a while)
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
        """Replace the active policy: `{"policy": name, **params}` (with `confidence`, `ensemble`),
        `{"target_saving": x}` or `{"max_risk": eps, ...}` (either optionally with `policy` and
        parameters to hold). Raises RequestError naming what is wrong."""
        with self._changing:
            active = self.resolve(spec, source)
            self._install(active)
        return active

    def _install(self, active: ActivePolicy) -> None:
        with self._lock:
            self._active = active
        cert = active.certificate
        self.metrics.policy_changes.labels(active.source).inc()
        self.metrics.target_saving.set(math.nan if active.target is None else active.target)
        expected = cert.saving if cert is not None else None if active.row is None else active.row["saving"]
        self.metrics.expected_saving.set(math.nan if expected is None else expected)
        self.metrics.max_risk.set(math.nan if cert is None else cert.max_risk)
        self.metrics.risk_bound.set(math.nan if cert is None else cert.bound)
        why = "" if active.target is None else f" for target saving {active.target}"
        if cert is not None:
            why = f": {cert.describe()} ({active.certified_on})"
        level = logging.WARNING if cert is not None and not cert.certified else logging.INFO
        log.log(level, "policy (%s): %s%s", active.source, active.policy, why)

    def calibrate(self) -> ActivePolicy:
        """Re-certify the active risk target on the shadow buffer alone and make its certificate
        the active policy. RequestError (409) when the active policy is no consistency risk target
        or the buffer holds too few inputs for it."""
        with self._changing:
            target = self._active.risk_target
            if target is None:
                raise RequestError('the active policy is not a risk target: set one first (PUT /v1/policy '
                                   '{"max_risk": 0.02}), then re-calibrate it on shadow traffic', status=409)
            if target.risk != "consistency":
                raise RequestError(f"a {target.risk} risk target cannot be re-certified on shadow traffic: it needs "
                                   "labels, which live inputs lack; use the consistency risk", status=409)
            have, need = len(self.shadow), target.min_inputs(self.model.num_layers, self.model.config.num_labels)
            if have < need:
                hint = " (start the service with --shadow-rate > 0)" if self.shadow.rate == 0 else ""
                raise RequestError(f"the shadow buffer holds {have} inputs; certifying a {target.risk} risk of "
                                   f"{target.max_risk} at delta {target.delta} needs at least {need}{hint}", status=409)
            active = self._certified(target, target.certify(self.shadow.outputs()),
                                     f"shadow buffer ({have} inputs)", "calibrate")
            self._install(active)
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
        params = {k: v for k, v in spec.items()
                  if k not in ("policy", "confidence", "ensemble", "target_saving", *RISK_KEYS)}
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"{key} must be a number, got {value!r}")
        stray = [k for k in RISK_KEYS[1:] if k in spec and "max_risk" not in spec]
        if stray or ("max_risk" in spec and "target_saving" in spec):
            raise RequestError(f"{', '.join(stray)}: only with a max_risk (a risk target)" if stray else
                               "give a target_saving or a max_risk, not both")
        try:
            if "max_risk" in spec:
                label = policies.compose_label(name or "pcee", confidence, ensemble)
                return self._from_risk(RiskTarget.from_spec(spec, label, params), source)
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

    def _from_risk(self, target: RiskTarget, source: str) -> ActivePolicy:
        if self.table is None:
            raise RequestError("this service has no calibration table (start it with a labelled split): "
                               "give explicit thresholds instead of a max_risk")
        policies.parse_label(target.label)
        return self._certified(target, target.certify(self.table.outputs, self.table.labels), self.table.source,
                               source)

    def _certified(self, target: RiskTarget, cert: risk.Certificate, data: str, source: str) -> ActivePolicy:
        if cert.policy.needs_lte and not self.model.config.lte:
            raise RequestError(policies.NEEDS_LTE.format(policy=cert.policy.label))
        return ActivePolicy(cert.policy, fixed=target.fixed, source=source, risk_target=target, certificate=cert,
                            certified_on=data)

    def describe_policy(self) -> dict:
        """The active policy, what the calibration table offers (per policy: the largest target
        saving it can meet), the realised saving, the shadow buffer and the controller's settings."""
        config = self.model.config
        out = {"active": self._active.describe(), "task": self.task.tsv_dir, "num_layers": self.model.num_layers,
               "policies": list(offline.applicable(config.num_labels, config.lte)),
               "realised_saving": self.realised_saving(), "shadow": self.shadow.describe()}
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

    def submit(self, texts, pairs=None) -> tuple[concurrent.futures.Future, ActivePolicy, float, list[bool]]:
        """Tokenise and queue a request's inputs under the policy active now: (future of
        `(exit_layer, outputs)`, that policy, arrival time, per input whether it was truncated)."""
        arrived = time.perf_counter()
        first, second = self.check_inputs(texts, pairs)
        rows, types = self.model.tokenizer.encode(first, second)
        active = self._active  # the policy of this request, whatever happens after
        future = self.engine.submit(rows, types, active.policy, self.shadow.choose(len(rows)))
        return future, active, arrived, self._truncated(first, second, rows)

    def _truncated(self, first, second, rows) -> list[bool]:
        """Whether each input had more tokens than the model takes (only a row cut to the full
        length can have been: those are encoded again, uncut)."""
        tokenizer, out = self.model.tokenizer, [False] * len(rows)
        full = [i for i, row in enumerate(rows) if len(row) >= tokenizer.max_length]
        if full:
            uncut = tokenizer.hf([first[i] for i in full], None if second is None else [second[i] for i in full],
                                 truncation=False, verbose=False)["input_ids"]
            for i, ids in zip(full, uncut):
                out[i] = len(ids) > tokenizer.max_length
        return out

    def _on_shadow(self, policy, ramps, exit_layer, outputs) -> None:
        """Shadowed inputs ran to the last layer: into the buffer, with whether their answer
        differs from the full model's (regression: by more than the risk target's tolerance)."""
        target = self._active.risk_target
        differs = served_differs(outputs, ramps, None if target is None else target.tolerance)
        self.shadow.add(ramps, differs)
        self.metrics.shadow_inputs.inc(len(differs))
        self.metrics.shadow_disagreements.inc(int(differs.sum()))
        self.metrics.shadow_buffer.set(len(self.shadow))
        self.metrics.shadow_consistency.set(self.shadow.consistency())

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


# ---- assembly ----------------------------------------------------------------------------------------------
def use_compile_cache(directory: Path) -> None:
    """Keep every compiled program in `directory` (JAX's persistent cache; on CPU too)."""
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    for option, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                          ("jax_persistent_cache_min_entry_size_bytes", 0)):
        try:
            jax.config.update(option, value)
        except AttributeError:  # an older jax without the option: its default applies
            pass


def calibration_table(source, task: glue.Task, model: EarlyExitModel, data_dir: str | None = None,
                      require: bool = False) -> CalibrationTable | None:
    """The calibration table of a run or an export (`checkpoints.resolve_checkpoint`'s answer) on its
    labelled dev split: an export's own `calibration.npz` unless `data_dir` is given, else the ramp
    outputs stored in the run (computed once). None, with a warning, when there is none (`require`:
    ValueError)."""
    exported = isinstance(source, checkpoints.ExportDir)
    data_dir = data_dir or source.train_config().get("data_dir")
    split = glue.resolve_splits(task, "dev")[0]
    try:
        return (export_table(source, task, split) if exported and data_dir is None else
                load_table(source, model, task, split, data_dir))
    except (OSError, ValueError) as e:
        if require:
            raise ValueError(f"no calibration table for --target-saving / --latency-slo-ms / --max-risk: {e}"
                             ) from None
        log.warning("no calibration table (target savings refused): %s", e)
        return None


def build_service(checkpoint: str | None = None, runs_dir: str = "runs", *,
                  start: dict | Callable[[EarlyExitModel], dict | None] | None = None,
                  table: bool | CalibrationTable = True,
                  require_table: bool = False, data_dir: str | None = None, max_batch: int = 32,
                  max_wait_s: float = 0.002, max_inputs: int = 256, compile_cache: str | os.PathLike | bool = True,
                  control: dict | None = None, shadow_rate: float = 0.0, shadow_buffer: int = 5000,
                  engine: str = "batch") -> Service:
    """Load the run (`checkpoint`, else the latest under `runs_dir`) or the exported directory
    (`checkpoint` = OUT of `jaxexit-export`), its calibration table on the labelled dev split
    (`calibration_table`; `table` may also be one computed already), the service with
    its first policy, warmed up, and with `control` its latency controller started.

    `start`: the first policy as a `Service.set_policy` spec, or a function of the model returning
    one (None: the full model). `require_table`: a missing table is an error (a target saving or a
    risk target needs it), else a warning. `compile_cache`: XLA's persistent cache directory (True:
    `<run>/serving/xla-cache`, an export's `OUT.jaxexit/serving/xla-cache`; False: none). `control`:
    `Controller` settings (`slo_s`, `min_saving`, `max_saving` (None: the most the active policy
    reaches on dev), `step`, `interval_s`, `window_s`). `shadow_rate`, `shadow_buffer`: shadow
    traffic (`ShadowBuffer`: that fraction of live inputs also runs to the last layer; the last
    `shadow_buffer` are kept). `engine`: `batch` or `layer` (`ENGINES`).
    """
    source = checkpoints.resolve_checkpoint(checkpoint, runs_dir)  # a run, or an exported directory
    if compile_cache is not False:
        use_compile_cache(Path(checkpoints.work_dir(source) / "serving" / "xla-cache" if compile_cache is True
                               else compile_cache))
    task, model = checkpoints.task_and_model(source)
    if isinstance(table, CalibrationTable):  # computed elsewhere (Ray Serve's application builder)
        calibration = table
    else:
        calibration = calibration_table(source, task, model, data_dir, require_table) if table else None
    service = Service(model, task, calibration, max_batch=max_batch, max_wait_s=max_wait_s, max_inputs=max_inputs,
                      source=str(source.path), shadow_rate=shadow_rate, shadow_buffer=shadow_buffer,
                      engine=engine)
    spec = start(model) if callable(start) else start
    if spec is None:
        log.info("no exit policy given: serving the full model (%d layers); turn it with PUT /v1/policy",
                 model.num_layers)
    else:
        service.set_policy(spec, source="start")
    began = time.perf_counter()
    shapes = service.warm_up()
    log.info("warm-up: %d batch shapes compiled in %.1f s (batches of up to %d inputs, lengths %s)", shapes,
             time.perf_counter() - began, max_batch, ", ".join(map(str, model.tokenizer.buckets)))
    if control is not None:
        _start_controller(service, **control)
    return service


def _start_controller(service: Service, slo_s: float, min_saving: float = 0.0, max_saving: float | None = None,
                      step: float = 0.05, interval_s: float = 1.0, window_s: float = 5.0) -> None:
    active = service.active
    reach = service.table.max_saving(active.policy.label, dict(active.fixed))
    top = reach if max_saving is None else max_saving
    if top > reach + 1e-9:
        raise ValueError(f"--max-saving {top} is beyond what {active.policy.label} reaches on dev ({reach:.3f})")
    service.controller = Controller(service, slo_s, min_saving, top, step=step, interval_s=interval_s,
                                    window_s=window_s).start()
    log.info("adaptive speed: p95 objective %.0f ms, target saving in [%.2f, %.2f]", slo_s * 1e3, min_saving, top)
