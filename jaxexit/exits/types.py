"""What the exit layer exchanges with a model: a ramp's output, and the model interface the
runners read (`RampModel`). Text and vision models implement it; nothing here knows either."""

from __future__ import annotations

from typing import Iterator, NamedTuple, Protocol

import jax
import numpy as np


class RampOutputs(NamedTuple):
    """A ramp's output on a model with a learning-to-exit module: its logits `[..., C]` and the
    LTE's pre-sigmoid output `[...]` (float32; `policies.predicted_error` is its sigmoid, at float64).
    Models without an LTE give the logits array alone."""

    logits: jax.Array
    lte: jax.Array


class RampModel(Protocol):
    """A multi-exit network as the runners (`jaxexit.exits.runners`) see it: L layers, a ramp after
    each. A batch is a dict of arrays with the row axis first."""

    @property
    def num_layers(self) -> int: ...

    @property
    def num_labels(self) -> int:
        """C, the width of a ramp's logits (1: regression)."""

    @property
    def has_lte(self) -> bool:
        """Whether ramps also give a learning-to-exit output (`RampOutputs`)."""

    def inputs(self, data, rows) -> dict:
        """The batch holding inputs `rows` (indices into `data`, a split of this model's inputs)."""

    def ramp_steps(self, batch: dict) -> Iterator:
        """Ramp 1..L outputs one layer at a time (a generator; `send(rows)` keeps only those rows)."""

    def final_logits(self, batch: dict) -> np.ndarray:
        """Ramp L's logits `[B, C]` from the dense network compiled as one function."""

    def device_exits(self, batch: dict, policy) -> tuple[jax.Array, jax.Array]:
        """The whole exit loop on the device (`jaxexit.exits.device.exit_loop`):
        `(exit_layer [B], prediction outputs [B, C])`."""


class DecidingModel(RampModel, Protocol):
    """A `RampModel` whose steps can also take the policy's decision on the device, which the
    pipelined latency runner (`runners.exit_one`) needs; others run latency with host decisions."""

    def decided_steps(self, policy, batch: dict, head_layers: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        """On a batch of one row: `(done, chosen)` device arrays after ramps m = `head_layers`
        (layers 1..m in one step: no row exits before `policies.earliest_exit`), m + 1, ..., L;
        each step is dispatched when the caller asks for the next pair, and does nothing once the
        previous `done` is set. `chosen`: the exit's prediction outputs `[1, C]`."""
