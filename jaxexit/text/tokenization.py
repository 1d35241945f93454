"""Tokenisation through transformers' fast tokenizer, padded to a few bucket lengths.

Padding every batch to the smallest bucket that holds its longest row keeps the number of
distinct shapes, and so of XLA compilations, small (at most `len(buckets)`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


class Tokenizer:
    """Wraps a Hugging Face fast tokenizer; returns numpy int32 arrays for the encoder.

    `tokenizer(texts)` or `tokenizer(texts, pairs)` -> `{"input_ids", "token_type_ids",
    "attention_mask"}`, each `[B, T]` with `T` a bucket length <= `max_length`.
    """

    def __init__(self, hf_tokenizer, max_length: int = 128, buckets: Sequence[int] = DEFAULT_BUCKETS):
        if not getattr(hf_tokenizer, "is_fast", False):
            raise TypeError(f"{type(hf_tokenizer).__name__} is not a fast tokenizer (tokenizers library)")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        if hf_tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.hf = hf_tokenizer
        self.max_length = int(max_length)
        self.buckets = tuple(sorted({b for b in buckets if b < self.max_length} | {self.max_length}))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_length: int = 128,
                        buckets: Sequence[int] = DEFAULT_BUCKETS) -> "Tokenizer":
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"no usable tokenizer files in {path}: {e}") from None
        return cls(hf, max_length=max_length, buckets=buckets)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    def bucket_length(self, longest: int) -> int:
        """The smallest bucket that holds `longest` tokens."""
        for bucket in self.buckets:
            if longest <= bucket:
                return bucket
        return self.max_length

    def __call__(self, texts: Sequence[str] | str, pairs: Sequence[str] | str | None = None,
                 length: int | None = None) -> dict[str, np.ndarray]:
        """Tokenise sentences (or sentence pairs), truncate to `max_length`, pad to a bucket.

        `length` pads to exactly that many tokens instead of a bucket (it must hold every row).
        """
        return self.pad(*self.encode(texts, pairs), length=length)

    def encode(self, texts: Sequence[str] | str, pairs: Sequence[str] | str | None = None
               ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token-type ids per row, truncated, not padded."""
        texts = _as_list(texts, "texts")
        if pairs is not None:
            pairs = _as_list(pairs, "pairs")
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        enc = self.hf(
            texts, pairs, truncation=True if pairs is None else "longest_first",
            max_length=self.max_length, padding=False, return_token_type_ids=True,
            return_attention_mask=False,
        )
        rows = enc["input_ids"]
        types = enc.get("token_type_ids") or [[0] * len(r) for r in rows]
        return rows, types

    def pad(self, rows: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None = None,
            length: int | None = None) -> dict[str, np.ndarray]:
        """Pad encoded rows to `length`, or to the smallest bucket that holds the longest."""
        longest = max(len(r) for r in rows)
        if length is None:
            length = self.bucket_length(longest)
        elif length < longest:
            raise ValueError(f"length {length} is shorter than the longest row ({longest} tokens)")
        out = {
            "input_ids": np.full((len(rows), length), self.pad_token_id, np.int32),
            "token_type_ids": np.zeros((len(rows), length), np.int32),
            "attention_mask": np.zeros((len(rows), length), np.int32),
        }
        for i, ids in enumerate(rows):
            out["input_ids"][i, : len(ids)] = ids
            out["attention_mask"][i, : len(ids)] = 1
            if types is not None:
                out["token_type_ids"][i, : len(ids)] = types[i]
        return out

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer files (so a checkpoint carries its own tokenizer)."""
        self.hf.save_pretrained(str(directory))


def _as_list(values, what: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    values = list(values)
    if not values:
        raise ValueError(f"{what} is empty: nothing to tokenise")
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{what}[{bad[0]}] is {type(values[bad[0]]).__name__}, expected str")
    return values
