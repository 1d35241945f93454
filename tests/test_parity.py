"""Numerical parity with transformers' PyTorch models (fp32): every layer within 1e-4.

The MiniLM check also runs without torch, against the committed golden file.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GOLDEN_MINILM, MINILM, require, sst2_parity_sentences
from jaxexit.text import modeling
from jaxexit import EarlyExitModel

TOL = 1e-4


def _max_diff_real(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Max |ours - ref| over real (non-padding) positions; arrays are [L+1, B, T, H]."""
    keep = mask.astype(bool)
    return float(np.abs(ours[:, keep] - ref[:, keep]).max())


def _pooled(model: EarlyExitModel, first_token: np.ndarray, layer: int) -> np.ndarray:
    pooler = model.ramp_params(layer)["pooler"]
    return np.asarray(modeling.Pooler(model.config).apply({"params": pooler}, first_token))


def _torch_states(torch_model, batch, arch: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Hidden states [L+1, B, T, H] via forward hooks (version-proof), and the pooler output."""
    import torch

    states = []
    hook = lambda module, args, out: states.append((out[0] if isinstance(out, tuple) else out).detach())  # noqa: E731
    enc = torch_model.encoder
    if arch == "albert":
        modules = [enc.embedding_hidden_mapping_in, *enc.albert_layer_groups]
    else:
        modules = [torch_model.embeddings, *enc.layer]
    handles = [m.register_forward_hook(hook) for m in modules]
    inputs = {k: torch.from_numpy(np.asarray(v)).long() for k, v in batch.items()}
    if arch == "roberta":
        inputs.pop("token_type_ids")
    with torch.no_grad():
        out = torch_model(**inputs)
    for h in handles:
        h.remove()
    pooled = None if out.pooler_output is None else out.pooler_output.numpy()
    return np.stack([s.numpy() for s in states]), pooled


# ---- MiniLM (real weights, real SST-2 sentences) -------------------------------------------------
def test_minilm_sentences_have_spread_out_lengths(minilm):
    batch = minilm.tokenize(sst2_parity_sentences())
    lengths = batch["attention_mask"].sum(1)
    assert len(lengths) >= 16 and len(set(lengths.tolist())) >= 12
    assert (lengths < batch["input_ids"].shape[1]).all()  # every row is padded in the shared batch


def test_minilm_matches_torch_every_layer(minilm):
    torch = pytest.importorskip("torch", reason="torch not installed: the golden-file test covers MiniLM")
    from transformers import BertModel

    batch = minilm.tokenize(sst2_parity_sentences())
    ref_model = BertModel.from_pretrained(str(require(MINILM)), attn_implementation="eager").eval()
    ref, ref_pooled = _torch_states(ref_model, batch, "bert")
    ours = minilm.hidden_states(batch)
    assert ours.shape == ref.shape == (7, len(batch["input_ids"]), batch["input_ids"].shape[1], 384)
    for layer in range(7):
        diff = _max_diff_real(ours[layer : layer + 1], ref[layer : layer + 1], batch["attention_mask"])
        assert diff < TOL, f"layer {layer}: max abs diff {diff}"
    # Every DeeBERT ramp pooler starts as the pretrained pooler.
    for layer in (0, 5):
        np.testing.assert_allclose(_pooled(minilm, ours[-1][:, 0], layer), ref_pooled, atol=TOL)
    assert torch.get_default_dtype() == torch.float32


def test_minilm_matches_golden_file(minilm):
    golden = np.load(GOLDEN_MINILM)
    sentences = [str(s) for s in golden["sentences"]]
    assert sentences == sst2_parity_sentences()
    batch = minilm.tokenize(sentences)
    np.testing.assert_array_equal(batch["input_ids"], golden["input_ids"])
    ours = minilm.hidden_states(batch)
    positions = golden["positions"]
    picked = np.take_along_axis(ours, positions[None, :, :, None], axis=2)
    assert picked.shape == golden["hidden"].shape
    per_layer = np.abs(picked - golden["hidden"]).max(axis=(1, 2, 3))
    assert (per_layer < TOL).all(), f"max abs diff per layer {per_layer}"
    np.testing.assert_allclose(_pooled(minilm, ours[-1][:, 0], 5), golden["pooler_output"], atol=TOL)


# ---- tiny random models built with transformers ---------------------------------------------------
def _tiny(arch: str, tmp_path, **overrides):
    """Save a random transformers model (safetensors) and load it into jaxexit."""
    torch = pytest.importorskip("torch", reason="torch not installed: tiny parity models need it")
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64)
    common.update(overrides)
    if arch == "bert":
        model = tf.BertModel(tf.BertConfig(**common))
    elif arch == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(pad_token_id=1, type_vocab_size=1, **common))
    else:
        model = tf.AlbertModel(tf.AlbertConfig(embedding_size=16, pad_token_id=0, **common))
    model.eval()
    # Random LayerNorm parameters too, so that a swapped scale/bias cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    ours = EarlyExitModel.from_pretrained(tmp_path, num_labels=3)
    return model, ours


def _random_batch(pad_id: int, rng=np.random.default_rng(0)):
    lengths = np.array([12, 5, 9, 3])
    ids = rng.integers(pad_id + 2, 99, size=(4, 12))
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, pad_id).astype(np.int32)
    types = ((np.arange(12)[None] >= 2) & (mask == 1)).astype(np.int32)  # a second segment
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("bert", {}),
        ("bert", dict(hidden_size=48, num_attention_heads=12, intermediate_size=50, num_hidden_layers=4)),  # TinyBERT-like shape
        ("roberta", {}),
        ("albert", dict(hidden_act="gelu_new", num_hidden_layers=4, num_hidden_groups=2)),
        ("albert", dict(num_hidden_layers=3)),  # one shared layer applied 3 times
    ],
)
def test_tiny_models_match_torch(arch, overrides, tmp_path):
    ref_model, ours = _tiny(arch, tmp_path, **overrides)
    batch = _random_batch(ours.config.pad_token_id)
    if arch == "roberta":
        batch["token_type_ids"] = np.zeros_like(batch["token_type_ids"])
    ref, ref_pooled = _torch_states(ref_model, batch, arch)
    got = ours.hidden_states(batch)
    assert got.shape == ref.shape
    for layer in range(len(got)):
        diff = _max_diff_real(got[layer : layer + 1], ref[layer : layer + 1], batch["attention_mask"])
        assert diff < TOL, f"{arch} layer {layer}: max abs diff {diff}"
    np.testing.assert_allclose(_pooled(ours, got[-1][:, 0], 0), ref_pooled, atol=TOL)
