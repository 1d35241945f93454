"""Tokenisation: single sentences and pairs, truncation, bucket padding (MiniLM's tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GLUE, MINILM, require
from jaxexit import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(require(MINILM), max_length=64)


def test_single_sentences(tok):
    batch = tok(["the movie was great", "bad"])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(v.dtype == np.int32 and v.shape == (2, 16) for v in batch.values())
    cls, sep = tok.hf.cls_token_id, tok.hf.sep_token_id
    assert batch["input_ids"][0, 0] == cls and batch["input_ids"][1, :3].tolist() == [cls, tok.hf.convert_tokens_to_ids("bad"), sep]
    assert batch["attention_mask"].sum(1).tolist() == [6, 3]
    assert (batch["input_ids"][1, 3:] == tok.pad_token_id).all() and (batch["token_type_ids"] == 0).all()
    np.testing.assert_array_equal(tok("bad")["input_ids"][0, :3], batch["input_ids"][1, :3])  # str is one row


def test_pairs_match_the_reference_tokenizer(tok):
    a, b = ["a man is playing a guitar .", "short"], ["a man plays guitar", "a much longer second sentence here"]
    batch = tok(a, b)
    for i in range(2):
        ref = tok.hf(a[i], b[i])
        n = len(ref["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == ref["input_ids"]
        assert batch["token_type_ids"][i, :n].tolist() == ref["token_type_ids"]
        assert batch["attention_mask"][i].sum() == n
        first_sep = ref["input_ids"].index(tok.hf.sep_token_id)
        assert set(batch["token_type_ids"][i, first_sep + 1 : n].tolist()) == {1}  # second segment


def test_truncation_single_and_pair(tok):
    long = " ".join(["word"] * 300)
    batch = tok([long, "hi"])
    assert batch["input_ids"].shape == (2, 64) and batch["attention_mask"][0].sum() == 64
    assert batch["input_ids"][0, -1] == tok.hf.sep_token_id
    pair = tok([long], [long])
    ids, types = pair["input_ids"][0], pair["token_type_ids"][0]
    assert pair["attention_mask"].sum() == 64 and ids[-1] == tok.hf.sep_token_id
    assert abs(int((types == 0).sum()) - int((types == 1).sum())) <= 1  # longest_first keeps both halves
    assert (ids == tok.hf.sep_token_id).sum() == 2


def test_buckets_and_explicit_length(tok):
    assert tok.buckets == (16, 32, 64)
    assert [tok.bucket_length(n) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert tok([" ".join(["word"] * 20)])["input_ids"].shape == (1, 32)
    assert tok(["x"], length=40)["input_ids"].shape == (1, 40)
    with pytest.raises(ValueError, match="shorter than the longest"):
        tok([" ".join(["word"] * 20)], length=8)


def test_sst2_dev_needs_few_shapes(tok):
    lines = require(GLUE / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t")[0] for line in lines]
    shapes = {tok(sentences[i : i + 32])["input_ids"].shape[1] for i in range(0, len(sentences), 32)}
    assert shapes <= set(tok.buckets) and len(shapes) <= 3


def test_bad_input_is_refused(tok):
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="2 texts but 1 pairs"):
        tok(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tok(["a", 3])
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(tok.hf, max_length=1)
