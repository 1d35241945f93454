"""The training stages, named: what each one trains and on which loss (docs/training.md).

Their values are what checkpoints (`meta.json`) and `metrics.jsonl` records hold under "stage",
so they never change: an `IntEnum` writes itself to JSON as the bare integer.
"""

from __future__ import annotations

import enum


class Stage(enum.IntEnum):
    JOINT = 0       # PABEE / PCEE: everything, on sum_i i * L_i / sum_i i
    BACKBONE = 1    # DeeBERT stage 1: embeddings, layers and ramp L, on L_L
    RAMPS = 2       # DeeBERT stage 2: ramps 1..L-1 only, on sum_{i<L} L_i (backbone frozen)
    ALTERNATE = 3   # BERxiT: everything, on L_L at even steps and sum_i L_i at odd ones
    LTE = 4         # BERxiT's learning to exit: the LTE module alone, backbone and ramps frozen

    @property
    def title(self) -> str:
        """What the progress bar and the per-epoch tables call it."""
        return _TITLES[self]


_TITLES = {Stage.JOINT: "joint", Stage.BACKBONE: "stage 1", Stage.RAMPS: "stage 2", Stage.ALTERNATE: "alternate",
           Stage.LTE: "learning to exit"}

# The stages each fine-tuning scheme runs, in order (`TrainConfig.stages` adds LTE and stage1_from).
SCHEME_STAGES = {"two_stage": (Stage.BACKBONE, Stage.RAMPS), "joint": (Stage.JOINT,), "alternate": (Stage.ALTERNATE,)}
