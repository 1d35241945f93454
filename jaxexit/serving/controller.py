"""Adaptive speed: the latency controller moves the service's target saving with the load."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jaxexit.serving.service import Service

log = logging.getLogger(__name__)


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
