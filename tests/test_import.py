"""Strict checkpoint import: what is loaded, what is refused, and why (no torch needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import tiny
from conftest import REPO
from jaxexit import CheckpointError, EarlyExitModel

H, I, L, V, P = 16, 24, 2, 40, 20
HF_CONFIG = dict(model_type="bert", vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=2,
                 intermediate_size=I, max_position_embeddings=P, type_vocab_size=2, hidden_act="gelu",
                 layer_norm_eps=1e-12, pad_token_id=0)


def bert_tensors(prefix: str = "", pooler: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    return tiny.bert_tensors(V, H, L, I, P, prefix=prefix, pooler=pooler, seed=seed)


def write_checkpoint(directory: Path, tensors: dict, config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or HF_CONFIG))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def load(directory: Path, **kw) -> EarlyExitModel:
    return EarlyExitModel.from_pretrained(directory, num_labels=2, **kw)


def test_loads_every_tensor_into_place(tmp_path):
    tensors = bert_tensors()
    model = load(write_checkpoint(tmp_path, tensors))
    bb = model.params["backbone"]
    np.testing.assert_array_equal(bb["layer"]["1"]["intermediate"]["dense"]["kernel"],
                                  tensors["encoder.layer.1.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(bb["layer"]["0"]["attention"]["output"]["LayerNorm"]["scale"],
                                  tensors["encoder.layer.0.attention.output.LayerNorm.weight"])
    np.testing.assert_array_equal(bb["embeddings"]["word_embeddings"]["embedding"],
                                  tensors["embeddings.word_embeddings.weight"])
    assert model.tokenizer is None  # no tokenizer files in this directory
    with pytest.raises(ValueError, match="no tokenizer"):
        model.tokenize(["hello"])


@pytest.mark.parametrize("prefix", ["bert.", ""])
def test_prefixed_names_heads_and_legacy_layernorm_names(tmp_path, prefix):
    plain = bert_tensors()
    tensors = {prefix + k: v for k, v in plain.items()}
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in tensors.items()}
    legacy["cls.predictions.bias"] = np.zeros(V, np.float32)  # MLM head: knowingly ignored
    legacy["cls.seq_relationship.weight"] = np.zeros((2, H), np.float32)  # NSP head
    legacy["classifier.weight"] = np.zeros((2, H), np.float32)  # another fine-tune's task head
    legacy[prefix + "embeddings.position_ids"] = np.arange(P, dtype=np.int64)[None]  # old buffer
    got = load(write_checkpoint(tmp_path / "legacy", legacy)).params["backbone"]
    want = load(write_checkpoint(tmp_path / "plain", plain)).params["backbone"]
    for a, b in zip(*(sorted_leaves(t) for t in (got, want))):
        np.testing.assert_array_equal(a, b)


def sorted_leaves(tree):
    import jax

    return [np.asarray(x) for _, x in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: str(kv[0]))]


def test_missing_tensor_is_named(tmp_path):
    tensors = bert_tensors()
    del tensors["encoder.layer.1.output.dense.bias"]
    with pytest.raises(CheckpointError, match=r"lacks .*encoder\.layer\.1\.output\.dense\.bias"):
        load(write_checkpoint(tmp_path, tensors))


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    tensors = bert_tensors()
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((I + 1, H), np.float32)
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.weight.*\(16, 25\).*\(16, 24\)"):
        load(write_checkpoint(tmp_path, tensors))


def test_unknown_extra_tensor_is_refused(tmp_path):
    tensors = bert_tensors()
    tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((H,), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*rotary"):
        load(write_checkpoint(tmp_path, tensors))


def test_more_layers_than_the_config_is_refused(tmp_path):
    config = dict(HF_CONFIG, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*encoder\.layer\.1\."):
        load(write_checkpoint(tmp_path, bert_tensors(), config))


def test_duplicate_prefixed_and_bare_names_are_refused(tmp_path):
    tensors = bert_tensors()
    tensors["bert.pooler.dense.bias"] = tensors["pooler.dense.bias"]
    with pytest.raises(CheckpointError, match="duplicates"):
        load(write_checkpoint(tmp_path, tensors))


def test_pickled_checkpoint_is_refused_with_the_reason_and_the_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02 not really a pickle")
    with pytest.raises(CheckpointError, match=r"arbitrary code.*save_pretrained"):
        load(tmp_path)


def test_sharded_checkpoint_with_index(tmp_path):
    tensors = bert_tensors()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = load(tmp_path).params["backbone"]
    want = load(write_checkpoint(tmp_path / "single", tensors)).params["backbone"]
    for a, b in zip(sorted_leaves(got), sorted_leaves(want)):
        np.testing.assert_array_equal(a, b)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="shards that are not there"):
        load(tmp_path)


def test_half_precision_file_is_cast_to_float32(tmp_path):
    tensors = {k: v.astype(np.float16) for k, v in bert_tensors().items()}
    model = load(write_checkpoint(tmp_path, tensors))
    kernel = model.params["backbone"]["layer"]["0"]["output"]["dense"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, tensors["encoder.layer.0.output.dense.weight"].T.astype(np.float32))


def test_checkpoint_without_pooler_gets_fresh_poolers(tmp_path):
    model = load(write_checkpoint(tmp_path, bert_tensors(pooler=False)))
    kernel = np.asarray(model.params["ramps"]["0"]["pooler"]["dense"]["kernel"])
    assert kernel.shape == (H, H) and kernel.std() > 0


def test_missing_or_wrong_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        load(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load(tmp_path / "empty")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path / "badjson")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text(json.dumps(HF_CONFIG))
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load(tmp_path / "corrupt")


HUB_SCRIPT = """
import sys
import jaxexit
model = jaxexit.EarlyExitModel.from_pretrained("acme/tiny-bert", num_labels=2)
print("loaded", model.num_layers, model.source)
try:
    jaxexit.EarlyExitModel.from_pretrained("acme/not-cached")
except FileNotFoundError as e:
    print("refused:", e)
"""


def test_hub_id_resolves_from_the_cache_offline(tmp_path):
    """The hub path through huggingface_hub, with HF_HUB_OFFLINE=1 and a populated cache."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    write_checkpoint(repo / "snapshots" / revision, bert_tensors())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"loaded {L} acme/tiny-bert" in out.stdout
    assert "refused:" in out.stdout and "HF_HUB_OFFLINE" in out.stdout
