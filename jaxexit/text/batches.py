"""GLUE examples -> tokenised, bucket-padded numpy batches for training and evaluation.

Each split is tokenised once. Training order is a permutation drawn from (seed, epoch), so a run
resumed at step k of an epoch sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from jaxexit.text import glue
from jaxexit.text.tokenization import Tokenizer


@dataclasses.dataclass
class EncodedSplit:
    """A tokenised split: ragged token ids, labels (NaN / -1 where unlabeled) and GLUE `idx`."""

    rows: list[list[int]]
    types: list[list[int]]
    labels: np.ndarray
    idx: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labelled(self) -> bool:
        """Every row has a label (test splits have none)."""
        return not (np.isnan(self.labels.astype(float)).any() or (self.labels < 0).any())

    def take(self, rows) -> "EncodedSplit":
        """The rows `rows` (indices), in that order."""
        rows = np.asarray(rows, np.int64)
        return EncodedSplit([self.rows[i] for i in rows], [self.types[i] for i in rows], self.labels[rows],
                            self.idx[rows])


def encode_examples(tokenizer: Tokenizer, task: glue.Task, examples: list[glue.Example]) -> EncodedSplit:
    if not examples:
        raise ValueError(f"no {task.tsv_dir} examples to encode")
    texts = [ex.text_a for ex in examples]
    pairs = [ex.text_b or "" for ex in examples] if task.is_pair else None
    rows, types = tokenizer.encode(texts, pairs)
    missing = np.nan if task.is_regression else -1
    labels = np.array([missing if ex.label is None else ex.label for ex in examples],
                      np.float32 if task.is_regression else np.int32)
    return EncodedSplit(rows, types, labels, np.array([ex.idx for ex in examples], np.int64))


def collate(tokenizer: Tokenizer, split: EncodedSplit, order: np.ndarray, size: int | None = None) -> dict:
    """Rows `order` as one batch padded to a bucket; `size` > len(order) adds weight-0 filler rows."""
    size = size or len(order)
    picked = list(order) + [order[0]] * (size - len(order))  # filler repeats a real row, weight 0
    batch = tokenizer.pad([split.rows[i] for i in picked], [split.types[i] for i in picked])
    labels = split.labels[picked]
    batch["label"] = np.nan_to_num(labels) if labels.dtype == np.float32 else np.maximum(labels, 0)
    batch["weight"] = (np.arange(size) < len(order)).astype(np.float32)
    return batch


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    if num_examples < batch_size:
        raise ValueError(f"batch size {batch_size} exceeds the {num_examples} training examples")
    return num_examples // batch_size  # the partial last batch is dropped: one shape per bucket


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(tokenizer: Tokenizer, split: EncodedSplit, batch_size: int, seed: int, epoch: int,
                  start: int = 0) -> Iterator[dict]:
    """The epoch's shuffled batches, starting at batch `start` (for resuming mid-epoch)."""
    order = epoch_order(len(split), seed, epoch)
    for b in range(start, steps_per_epoch(len(split), batch_size)):
        yield collate(tokenizer, split, order[b * batch_size : (b + 1) * batch_size])


def eval_batches(tokenizer: Tokenizer, split: EncodedSplit, batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
    """(positions, batch) over the whole split, shortest rows first (less padding), fixed batch size."""
    order = np.argsort([len(r) for r in split.rows], kind="stable")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, collate(tokenizer, split, chunk, size=batch_size)
