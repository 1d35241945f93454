"""The layer engine's scheduling rule and row buckets (docs/serving.md, "Engines").

The rule (`pick`), counted in steps: among the queues with a row that can run (at layer
1: a free slot), a queue whose oldest row has waited `max_age` steps or more runs first (the
longest-waiting, deepest on ties). Else, of the queues with rows enough for a full step
(`max_batch`) if any, else of all, the deepest runs, the one with more waiting rows on ties, then
the shorter length: rows that went deep are answered soonest and give back their slots while new
inputs gather at layer 1 into a fuller step, and a full step is never held back (under more load
than the engine keeps up with, its steps stay full). The bound is needed: two lengths' new inputs
can keep one full queue ahead of the other's at layer 1. A step takes the oldest rows of its queue,
up to `max_batch`, padded to their row bucket. With nothing but new inputs waiting, fewer than
`max_batch` in every queue, the engine waits up to `max_wait_s` after the oldest for more, like the
batch engine.

Row buckets (`row_buckets`): every count up to a quarter of `max_batch`, then multiples of an
eighth; a step here is often a few rows, and padding 5 to 8 would cost 60% more.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from jaxexit.exits import runners


class Candidate(NamedTuple):
    """A queue that can run: its layer (1-based), length bucket, rows that can run, and how many
    steps its oldest row has waited."""

    layer: int
    length: int
    rows: int
    age: int


def pick(candidates: list[Candidate], max_batch: int, max_age: int) -> Candidate | None:
    """The queue the next step runs (the module's docstring states the rule)."""
    if not candidates:
        return None
    starving = [c for c in candidates if c.age >= max_age]
    if starving:
        return max(starving, key=lambda c: (c.age, c.layer, -c.length))
    full = [c for c in candidates if c.rows >= max_batch]
    return max(full or candidates, key=lambda c: (c.layer, min(c.rows, max_batch), -c.length))


@functools.lru_cache(maxsize=None)  # read at every step
def row_buckets(cap: int) -> tuple[int, ...]:
    """The row counts a step of at most `cap` rows is padded to: the batched runner's
    (`runners.row_buckets`: multiples of cap/8) and every count up to cap/4."""
    return tuple(sorted(set(runners.row_buckets(cap)) | set(range(1, cap // 4 + 1))))


def row_bucket(n: int, cap: int) -> int:
    return next(b for b in row_buckets(cap) if b >= n)
