"""Shadow traffic and risk targets: the inputs that also run to the last layer (`ShadowBuffer`,
their every ramp's outputs, recent ones kept) and a risk the service certifies its policy for
(`RiskTarget`, Learn then Test through `jaxexit.exits.risk`), on the calibration table's split or
on the shadow buffer alone (label-free: the consistency risk). docs/serving.md, "Risk targets".
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np

from jaxexit.exits import offline, policies, risk
from jaxexit.exits.types import RampOutputs
from jaxexit.serving.errors import RequestError

RISK_KEYS = ("max_risk", "risk_delta", "risk", "risk_bound", "risk_tolerance")


@dataclasses.dataclass(frozen=True)
class RiskTarget:
    """What a certified policy was asked for: policy `label`'s settings (its parameters in `fixed`
    held) whose `risk` is at most `max_risk` with probability >= 1 - `delta`."""

    label: str
    max_risk: float
    delta: float = 0.1
    risk: str = "consistency"
    method: str = "binomial"
    tolerance: float | None = None
    fixed: tuple = ()

    @classmethod
    def from_spec(cls, spec: dict, label: str, fixed: dict) -> "RiskTarget":
        """From a `PUT /v1/policy` body's risk fields (values checked by `certify`)."""
        return cls(label, spec["max_risk"], spec.get("risk_delta", 0.1), spec.get("risk", "consistency"),
                   spec.get("risk_bound", "binomial"), spec.get("risk_tolerance"), tuple(sorted(fixed.items())))

    def as_dict(self) -> dict:
        return {"policy": self.label, "max_risk": self.max_risk, "risk_delta": self.delta, "risk": self.risk,
                "risk_bound": self.method, "risk_tolerance": self.tolerance, "fixed": dict(self.fixed)}

    def certify(self, outputs, labels=None) -> risk.Certificate:
        """Learn then Test on `outputs [L, N, C]` (labels only for the drop risk); RequestError for
        bad values. An uncertifiable target is not an error: the full model, `certified` False."""
        try:
            return risk.certify(self.label, outputs, risk=self.risk, max_risk=self.max_risk, delta=self.delta,
                                labels=labels if self.risk == "drop" else None, tolerance=self.tolerance,
                                method=self.method, fixed=dict(self.fixed))
        except (ValueError, TypeError) as e:
            raise RequestError(str(e)) from None

    def min_inputs(self, num_layers: int, num_labels: int) -> int:
        """The fewest inputs on which any setting can be certified (none of them a risk event)."""
        sequences = risk.sequences(self.label, num_layers, num_labels, dict(self.fixed))
        return risk.min_inputs(self.max_risk, self.delta / len(sequences))


class ShadowBuffer:
    """The shadowed inputs: a fraction `rate` of live inputs (drawn per input from a generator
    seeded with `seed`) that also run to the last layer. The `capacity` most recent are kept: every
    ramp's outputs `[L, C]` (and the LTE's `[L]`), and whether the prediction served differs from
    the full model's (the realised consistency risk)."""

    def __init__(self, rate: float = 0.0, capacity: int = 5000, seed: int = 0):
        if isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"the shadow rate must be in [0, 1], got {rate!r}")
        if capacity < 1:
            raise ValueError(f"the shadow buffer must hold >= 1 input, got {capacity}")
        self.rate, self.capacity = float(rate), int(capacity)
        self._rng = np.random.default_rng(seed)
        self._items: collections.deque[tuple] = collections.deque(maxlen=self.capacity)
        self._differ = 0  # of self._items, kept as inputs come and go
        self._lock = threading.Lock()

    def choose(self, n: int) -> np.ndarray | None:
        """Which of `n` inputs to shadow (bool `[n]`), None when none is."""
        if self.rate == 0.0:
            return None
        with self._lock:
            chosen = self._rng.random(n) < self.rate
        return chosen if chosen.any() else None

    def add(self, ramps, differs: np.ndarray) -> None:
        """Shadowed inputs: their ramp outputs `[L, n, C]` (or `RampOutputs`) and, per input,
        whether the prediction served differed from the full model's."""
        logits, lte = offline.parts(ramps)
        with self._lock:
            for i, d in enumerate(np.asarray(differs, bool).tolist()):
                if len(self._items) == self.capacity:
                    self._differ -= self._items[0][2]  # the oldest leaves
                self._items.append((logits[:, i].copy(), None if lte is None else lte[:, i].copy(), d))
                self._differ += d

    def __len__(self) -> int:
        return len(self._items)

    def outputs(self):
        """The buffer's ramp outputs `[L, N, C]` (`RampOutputs` with the LTE's), oldest first."""
        with self._lock:
            items = list(self._items)
        if not items:
            raise ValueError("the shadow buffer is empty")
        logits = np.stack([z for z, _, _ in items], axis=1)
        if items[0][1] is None:
            return logits
        return RampOutputs(logits, np.stack([u for _, u, _ in items], axis=1))

    def consistency(self) -> float | None:
        """The fraction of the buffer's inputs served a prediction other than the full model's."""
        with self._lock:
            return self._differ / len(self._items) if self._items else None

    def describe(self) -> dict:
        return {"rate": self.rate, "capacity": self.capacity, "inputs": len(self),
                "realised_consistency_risk": self.consistency()}


def served_differs(policy_outputs: np.ndarray, ramps, tolerance: float | None = None) -> np.ndarray:
    """Per shadowed input: whether the prediction served (from `policy_outputs [n, C]`) differs
    from the full model's (ramp L of `ramps [L, n, C]`), as the consistency risk counts it."""
    full = offline.ramp_predictions(ramps)[-1]
    return risk.events("consistency", policies.prediction(policy_outputs), full, tolerance=tolerance)
