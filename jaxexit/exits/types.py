"""What the exit layer exchanges with a model: a ramp's output, and the model interface the
runners read (`RampModel`). Text and vision models implement it; nothing here knows either."""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Protocol

import jax
import numpy as np


class RampOutputs(NamedTuple):
    """A ramp's output on a model with a learning-to-exit module: its logits `[..., C]` and the
    LTE's pre-sigmoid output `[...]` (float32; `policies.predicted_error` is its sigmoid, at float64).
    Models without an LTE give the logits array alone."""

    logits: jax.Array
    lte: jax.Array


class RampModel(Protocol):
    """A multi-exit network as the runners (`jaxexit.exits.runners`) see it.

    `config` needs `num_labels` and `lte` (whether ramps also give a learning-to-exit output).
    A batch is a dict of arrays with the row axis first.
    """

    config: Any

    @property
    def num_layers(self) -> int: ...

    def inputs(self, data, rows) -> dict:
        """The batch holding inputs `rows` (indices into `data`, a split of this model's inputs)."""

    def ramp_steps(self, batch: dict) -> Iterator:
        """Ramp 1..L outputs one layer at a time (a generator; `send(rows)` keeps only those rows)."""

    def final_logits(self, batch: dict) -> np.ndarray:
        """Ramp L's logits `[B, C]` from the dense network compiled as one function."""

    def device_exits(self, batch: dict, policy) -> tuple[jax.Array, jax.Array]:
        """The whole exit loop on the device: `(exit_layer [B], prediction outputs [B, C])`."""
