"""Model behaviour: piecewise == whole, one compile for every layer, dropout, ramp initialisation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import sst2_parity_sentences
from jaxexit import EarlyExitModel, EncoderConfig, init_ramps


def tiny_config(**overrides) -> EncoderConfig:
    fields = dict(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=32, num_labels=3)
    fields.update(overrides)
    return EncoderConfig(**fields)


def tiny_batch(vocab: int = 60, pad: int = 0):
    rng = np.random.default_rng(1)
    mask = (np.arange(16)[None] < np.array([[16], [7], [11]])).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(pad + 1, vocab, (3, 16)), pad).astype(np.int32)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": mask}


def run_piecewise(model: EarlyExitModel, batch: dict):
    hidden, bias = model.embed_step(model.params, batch)
    states, logits = [hidden], []
    for layer in range(model.num_layers):
        hidden, z = model.layer_step(model.layer_params(layer), model.ramp_params(layer), hidden, bias)
        states.append(hidden)
        logits.append(z)
    return np.stack(states), np.stack(logits)


def test_piecewise_equals_whole_minilm(minilm):
    batch = minilm.tokenize(sst2_parity_sentences())
    states, logits = run_piecewise(minilm, batch)
    whole_states, whole_logits = minilm.hidden_states(batch), minilm.ramp_logits(batch)
    assert logits.shape == whole_logits.shape == (6, len(batch["input_ids"]), 2)
    keep = batch["attention_mask"].astype(bool)
    for layer in range(7):
        np.testing.assert_allclose(states[layer][keep], whole_states[layer][keep], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, whole_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [dict(ramp_pooler="shared"), dict(arch="albert", embedding_size=16, num_hidden_groups=2),
     dict(arch="roberta", pad_token_id=1, type_vocab_size=1)],
)
def test_piecewise_equals_whole_tiny(overrides):
    model = EarlyExitModel.from_config(tiny_config(**overrides))
    batch = tiny_batch(pad=model.config.pad_token_id)
    states, logits = run_piecewise(model, batch)
    np.testing.assert_allclose(states, model.hidden_states(batch), atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, model.ramp_logits(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("from_tokens", [0, 10**9])
def test_ramp_steps_equal_whole_minilm(minilm, from_tokens):
    # from_tokens=0: the first-token exit steps (a layer at the first token for its ramp, then the
    # rest); 10**9: the plain layer step.
    model = EarlyExitModel(minilm.config, minilm.params, minilm.tokenizer)
    model.first_token_steps_from = from_tokens
    batch = model.tokenize(sst2_parity_sentences())
    np.testing.assert_allclose(np.stack(list(model.ramp_steps(batch))), model.ramp_logits(batch), atol=1e-5, rtol=0)
    # first-token steps: one step for layers 2..L; plain: one for layers 2..L-1, one for layer L at the first token
    assert model.exit_step._cache_size() == (1 if from_tokens == 0 else 2)


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(ramp_pooler="shared"), dict(arch="albert", embedding_size=16, num_hidden_groups=2),
     dict(arch="roberta", pad_token_id=1, type_vocab_size=1), dict(num_hidden_layers=1)],
)
def test_exit_steps_equal_whole_tiny_and_compile_once(overrides):
    model = EarlyExitModel.from_config(tiny_config(**overrides))
    model.first_token_steps_from = 0
    batch = tiny_batch(pad=model.config.pad_token_id)
    logits = np.stack(list(model.ramp_steps(batch)))
    np.testing.assert_allclose(logits, model.ramp_logits(batch), atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[-1], model.final_logits(batch), atol=1e-5, rtol=0)
    list(model.ramp_steps(batch))
    assert model.first_exit_step._cache_size() == 1
    assert model.exit_step._cache_size() == (1 if model.num_layers > 1 else 0)


def test_one_layer_models_exit_at_layer_1_in_every_form():
    """L = 1: the device loop has no branch to switch over and the pipelined path no step after its
    first call; both give the host steps' logits."""
    from jaxexit.exits import policies, runners

    model = EarlyExitModel.from_config(tiny_config(num_hidden_layers=1))
    batch = tiny_batch()
    policy = policies.make_policy("entropy", 1, 3, S=0.5)
    want = np.asarray(next(model.ramp_steps(batch)))
    exit_layer, chosen = model.device_exits(batch, policy)
    np.testing.assert_array_equal(exit_layer, [1, 1, 1])
    np.testing.assert_allclose(chosen, want, atol=1e-5, rtol=0)
    layer, logits = runners.exit_one(model, policy, {k: v[:1] for k, v in batch.items()})
    assert layer == 1
    np.testing.assert_allclose(logits, want[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("from_tokens", [0, 10**9])
def test_ramp_steps_keep_the_rows_sent(from_tokens):
    model = EarlyExitModel.from_config(tiny_config())
    model.first_token_steps_from = from_tokens
    batch = tiny_batch()
    whole = model.ramp_logits(batch)
    steps = model.ramp_steps(batch)
    np.testing.assert_allclose(next(steps), whole[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(steps.send(np.array([2, 0])), whole[1][[2, 0]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(steps.send(np.array([1])), whole[2][[0]], atol=1e-5, rtol=0)  # row 1 of [2, 0]
    np.testing.assert_allclose(next(steps), whole[3][[0]], atol=1e-5, rtol=0)
    with pytest.raises(StopIteration):
        next(steps)


@pytest.mark.parametrize("overrides", [{}, dict(ramp_pooler="shared"), dict(arch="albert", embedding_size=16)])
def test_layer_step_compiles_once_for_all_layers(overrides):
    model = EarlyExitModel.from_config(tiny_config(num_hidden_layers=6, **overrides))
    batch = tiny_batch()
    run_piecewise(model, batch)
    assert model.layer_step._cache_size() == 1
    assert model.embed_step._cache_size() == 1
    run_piecewise(model, batch)  # a second pass reuses it
    assert model.layer_step._cache_size() == 1


def test_parameter_tree_separates_backbone_and_ramps():
    cfg = tiny_config()
    params = EarlyExitModel.from_config(cfg).params
    assert set(params) == {"backbone", "ramps"}
    assert set(params["backbone"]) == {"embeddings", "layer"}
    assert set(params["backbone"]["layer"]) == {str(i) for i in range(4)}
    assert set(params["ramps"]) == {str(i) for i in range(4)}
    assert set(params["ramps"]["0"]) == {"pooler", "classifier"}
    assert params["ramps"]["0"]["classifier"]["kernel"].shape == (32, 3)
    shared = EarlyExitModel.from_config(cfg.replace(ramp_pooler="shared")).params["ramps"]
    assert set(shared) == {"pooler"} | {str(i) for i in range(4)}
    assert set(shared["2"]) == {"classifier"}
    albert = EarlyExitModel.from_config(cfg.replace(arch="albert", embedding_size=8)).params["backbone"]
    assert set(albert["layer"]) == {"0"}  # one layer shared by all four
    assert albert["embeddings"]["embedding_hidden_mapping_in"]["kernel"].shape == (8, 32)


def test_dropout_only_with_an_rng():
    model = EarlyExitModel.from_config(tiny_config(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3))
    batch = tiny_batch()
    hidden, bias = model.embed_step(model.params, batch)
    args = (model.layer_params(0), model.ramp_params(0), hidden, bias)
    eval_a, eval_b = model.layer_step(*args), model.layer_step(*args)
    np.testing.assert_array_equal(eval_a[1], eval_b[1])  # eval mode is deterministic
    key = jax.random.PRNGKey(3)
    train_a, train_b = model.layer_step(*args, rng=key), model.layer_step(*args, rng=key)
    np.testing.assert_array_equal(train_a[1], train_b[1])  # same rng, same mask
    assert not np.allclose(train_a[0], eval_a[0])
    other = model.layer_step(*args, rng=jax.random.PRNGKey(4))
    assert not np.allclose(other[0], train_a[0])


def test_ramps_start_from_the_pretrained_pooler(minilm):
    from safetensors.numpy import load_file

    from conftest import MINILM

    file = load_file(MINILM / "model.safetensors")
    kernel, bias = file["pooler.dense.weight"].T, file["pooler.dense.bias"]
    ramps = minilm.params["ramps"]
    for i in range(6):  # DeeBERT: an own pooler per ramp, each a copy of the pretrained one
        np.testing.assert_array_equal(ramps[str(i)]["pooler"]["dense"]["kernel"], kernel)
        np.testing.assert_array_equal(ramps[str(i)]["pooler"]["dense"]["bias"], bias)
        classifier = np.asarray(ramps[str(i)]["classifier"]["kernel"])
        assert np.all(np.asarray(ramps[str(i)]["classifier"]["bias"]) == 0)
        assert 0.01 < classifier.std() < 0.03  # N(0, initializer_range = 0.02)
    kernels = [np.asarray(ramps[str(i)]["classifier"]["kernel"]) for i in range(6)]
    assert not np.allclose(kernels[0], kernels[1])  # independent classifiers

    cfg = minilm.config.replace(ramp_pooler="shared")
    shared = init_ramps(cfg, jax.random.PRNGKey(0), {"dense": {"kernel": kernel, "bias": bias}})
    np.testing.assert_array_equal(shared["pooler"]["dense"]["kernel"], kernel)
    assert "pooler" not in shared["0"]


def test_ramps_without_a_pretrained_pooler_are_fresh():
    cfg = tiny_config()
    ramps = init_ramps(cfg, jax.random.PRNGKey(0), pooler=None)
    k0, k1 = ramps["0"]["pooler"]["dense"]["kernel"], ramps["1"]["pooler"]["dense"]["kernel"]
    assert 0.01 < np.std(k0) < 0.03 and not np.allclose(k0, k1)
    np.testing.assert_array_equal(ramps["0"]["pooler"]["dense"]["bias"], 0)


def test_bad_batches_are_refused(minilm):
    with pytest.raises(KeyError, match="attention_mask"):
        minilm.ramp_logits({"input_ids": np.zeros((1, 4), np.int32), "token_type_ids": np.zeros((1, 4), np.int32)})
    with pytest.raises(ValueError, match="one \\[B, T\\] shape"):
        minilm.ramp_logits({"input_ids": np.zeros((1, 4)), "token_type_ids": np.zeros((1, 4)),
                            "attention_mask": np.zeros((1, 5))})


def test_batches_of_any_integer_kind_give_the_same_logits():
    """Host batches stay on the host until the jitted call (no conversion dispatch per key: see
    `text_model._int32`); int64 numpy, lists and device arrays of other dtypes give the int32 batch's output."""
    import jax.numpy as jnp

    model = EarlyExitModel.from_config(tiny_config(), seed=0)
    batch = tiny_batch()
    want = model.final_logits(batch)
    checked = model._check(batch)
    assert all(type(v) is np.ndarray and v.dtype == np.int32 for v in checked.values())
    variants = [{k: v.astype(np.int64) for k, v in batch.items()}, {k: v.tolist() for k, v in batch.items()},
                {k: jnp.asarray(v) for k, v in batch.items()}, {k: jnp.asarray(v, jnp.uint8) for k, v in batch.items()}]
    for variant in variants:
        assert all(v.dtype == np.int32 for v in model._check(variant).values())
        np.testing.assert_array_equal(model.final_logits(variant), want)
        np.testing.assert_array_equal(model.ramp_logits(variant), model.ramp_logits(batch))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="ramp_pooler"):
        tiny_config(ramp_pooler="both")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        tiny_config(num_attention_heads=5)
    with pytest.raises(ValueError, match="model_type"):
        EncoderConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        EncoderConfig.from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
    cfg = tiny_config(arch="albert", embedding_size=8, num_hidden_layers=6, num_hidden_groups=3)
    assert [cfg.layer_param_index(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides", [{}, dict(ramp_pooler="shared", lte=True), dict(arch="albert", embedding_size=16)])
def test_transposed_kernels_compute_the_same_numbers(overrides):
    """`modeling.transpose_kernels` (what inference computes with on CPU) moves every dense kernel
    to `kernel_t` `[out, in]` and nothing else, and the model gives the canonical layout's numbers."""
    from jaxexit.text import model as text_model, modeling

    model = EarlyExitModel.from_config(tiny_config(**overrides))
    canonical, moved = model.params, modeling.transpose_kernels(model.params)
    flat_c = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(canonical)}
    flat_t = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(moved)}
    kernels = [k for k in flat_c if k.endswith("['kernel']")]
    assert len(kernels) >= 6 and not any(k.endswith("['kernel']") for k in flat_t)
    for k in kernels:
        np.testing.assert_array_equal(flat_t[k[:-len("['kernel']")] + "['kernel_t']"], np.asarray(flat_c[k]).T)
    assert {k for k in flat_c if k not in kernels} == {k for k in flat_t if not k.endswith("['kernel_t']")}
    assert jax.tree.structure(modeling.transpose_kernels(moved)) == jax.tree.structure(moved)  # idempotent

    batch = tiny_batch()
    ours, theirs = text_model._whole(model.config, moved, batch), text_model._whole(model.config, canonical, batch)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if jax.default_backend() == "cpu":
        assert jax.tree.structure(model.step_params) == jax.tree.structure(moved)
    np.testing.assert_allclose(model.ramp_logits(batch), theirs[0], rtol=1e-5, atol=1e-6)


def test_an_inference_model_holds_each_kernel_once_and_still_gives_its_canonical_params():
    """On the CPU inference computes with transposed kernels (`step_params`); once those exist the
    model drops the canonical tree instead of keeping both (twice the kernels' memory), and
    `params` rebuilds it exactly, so training from a model that has already run inference, or a new
    model made from its `params`, sees the same numbers."""
    from jaxexit.text import modeling

    model = EarlyExitModel.from_config(tiny_config())
    before = jax.tree.map(np.asarray, model.params)
    kernel_bytes = sum(v.nbytes for p, v in jax.tree_util.tree_leaves_with_path(before)
                       if jax.tree_util.keystr(p).endswith("['kernel']"))
    logits = model.ramp_logits(tiny_batch())

    def held(m):  # distinct arrays the model object keeps
        leaves = {id(x): x for tree in vars(m).values() if isinstance(tree, dict) for x in jax.tree.leaves(tree)}
        return sum(x.nbytes for x in leaves.values())

    total = sum(v.nbytes for v in jax.tree.leaves(before))
    if jax.default_backend() == "cpu":
        assert held(model) == total  # not total + kernel_bytes
        assert kernel_bytes > total / 2
    again = model.params
    assert jax.tree.structure(again) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(modeling.untranspose_kernels(model.step_params)) == jax.tree.structure(before)
    np.testing.assert_array_equal(EarlyExitModel(model.config, again).ramp_logits(tiny_batch()), logits)
