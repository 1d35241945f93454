"""Ramp input `mean` (docs/training.md, Ramp input): ramps read the masked mean of their layer's token
states; every path (whole model, steps, dense baseline, training, every runner) honours it; the
first-token exit steps are for `cls` only. Regression ramps start at the labels' mean."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tiny
from conftest import every_live_mode
from jaxexit.text import modeling
from jaxexit.exits import offline, policies, runners
from jaxexit import EarlyExitModel, EncoderConfig
from jaxexit.text.batches import EncodedSplit
from jaxexit.text.train_config import TrainConfig
from jaxexit.text.trainer import finetune, ramps_at_label_mean


def tiny_config(**overrides) -> EncoderConfig:
    fields = dict(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=32, num_labels=3, ramp_input="mean")
    return EncoderConfig(**{**fields, **overrides})


def padded_batch():
    rng = np.random.default_rng(1)
    mask = (np.arange(16)[None] < np.array([[16], [3], [9], [1]])).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, 60, (4, 16)), 0).astype(np.int32)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": mask}


def numpy_mean_ramps(model, batch):
    """Every ramp's logits from a numpy masked mean of the layer states, through the Ramp module."""
    hidden, mask = model.hidden_states(batch), batch["attention_mask"].astype(np.float64)
    out = []
    for i in range(model.num_layers):
        mean = (hidden[i + 1] * mask[:, :, None]).sum(1) / mask.sum(1)[:, None]
        out.append(np.asarray(modeling.Ramp(model.config).apply({"params": model.ramp_params(i)},
                                                                mean.astype(np.float32))))
    return np.stack(out)


@pytest.mark.parametrize("pooler", ["per_ramp", "shared"])
def test_mean_ramps_equal_a_numpy_reference_on_padded_batches(pooler):
    model = EarlyExitModel.from_config(tiny_config(ramp_pooler=pooler))
    batch = padded_batch()
    want = numpy_mean_ramps(model, batch)
    np.testing.assert_allclose(model.ramp_logits(batch), want, atol=1e-5)
    np.testing.assert_allclose(np.stack(list(model.ramp_steps(batch))), want, atol=1e-5)
    np.testing.assert_allclose(model.final_logits(batch), want[-1], atol=1e-5)
    # padding does not leak into the mean: each row alone gives the same logits
    for row in range(4):
        n = int(batch["attention_mask"][row].sum())
        alone = {k: v[row:row + 1, :n] for k, v in batch.items()}
        np.testing.assert_allclose(model.ramp_logits(alone)[:, 0], want[:, row], atol=1e-5)
    cls = EarlyExitModel(model.config.replace(ramp_input="cls"), model.params)
    assert not np.allclose(cls.ramp_logits(batch), want, atol=1e-3)  # the two inputs really differ


def test_first_token_steps_are_for_cls_ramps_only():
    model = EarlyExitModel.from_config(tiny_config())
    assert model.step_plan((4096, 128)) == (4, False, False)  # mean-pooled ramps read every token of layer L
    assert EarlyExitModel.from_config(tiny_config(ramp_input="cls")).step_plan((4096, 128)).first_token
    with pytest.raises(ValueError, match="need ramp_input 'cls'"):
        model.first_exit_step("first_token", model.params, model.layer_params(0), model.ramp_params(0),
                              padded_batch())


def test_every_mode_equals_offline_with_mean_ramps(tmp_path):
    directory = tiny.make_tiny_checkpoint(tmp_path / "ckpt", layers=4)
    model = EarlyExitModel.from_pretrained(directory, num_labels=3, ramp_input="mean")
    model.first_token_steps_from = 0  # would take the first-token steps if the ramps read the first token
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(tiny.VOCAB[5:], size=rng.integers(2, 12))) for _ in range(24)]
    rows, types = model.tokenizer.encode(texts)
    split = EncodedSplit(rows, types, np.zeros(24, np.int32), np.arange(24))
    cached = runners.cached_logits(model, split, batch_size=8)
    norm = np.sort(policies.normalized_entropy(cached).ravel())
    for name, params in [("pcee", dict(patience=1, tau=float((norm[30] + norm[31]) / 2))),
                         ("pabee", dict(patience=1)), ("static", dict(k=2))]:
        policy = policies.make_policy(name, 4, 3, **params)
        want = offline.evaluate(policy, cached)
        for mode, result in every_live_mode(model, policy, split, batch_size=8):
            np.testing.assert_array_equal(result.exit_layer, want.exit_layer, err_msg=f"{mode} {policy}")
            np.testing.assert_array_equal(result.prediction, want.prediction, err_msg=f"{mode} {policy}")


@pytest.mark.parametrize("scheme", ["two_stage", "joint"])
def test_ramp_input_trains_is_saved_and_loaded_with_the_run(tmp_path, scheme):
    model, data = tiny.make_tiny_checkpoint(tmp_path / "model"), tiny.make_tiny_glue(tmp_path / "glue")
    cfg = TrainConfig(task="sst2", model=str(model), data_dir=str(data / "SST-2"), scheme=scheme, ramp_input="mean",
                      batch_size=8, max_length=32, lr=1e-3, max_steps=3, output_dir=str(tmp_path / "runs"),
                      run_name="mean")
    run = finetune(cfg, progress=False)
    assert json.loads((run.path / "encoder_config.json").read_text())["ramp_input"] == "mean"
    assert json.loads((run.path / "train_config.json").read_text())["ramp_input"] == "mean"
    loaded = EarlyExitModel.from_run(run.path)
    assert loaded.config.ramp_input == "mean"
    summary = json.loads((run.path / "summary.json").read_text())
    batch = loaded.tokenize(["good film", "a dull and boring plot"])
    np.testing.assert_allclose(loaded.ramp_logits(batch), numpy_mean_ramps(loaded, batch), atol=1e-5)
    assert len(summary["per_layer"]["validation"]) == 3


def test_regression_ramps_start_at_the_label_mean(tmp_path):
    params = EarlyExitModel.from_config(tiny_config(num_labels=1)).params
    moved = ramps_at_label_mean(params, range(3), 2.7)
    for i in range(4):
        bias = np.asarray(moved["ramps"][str(i)]["classifier"]["bias"])
        assert bias.tolist() == ([np.float32(2.7)] if i < 3 else np.asarray(params["ramps"]["3"]["classifier"]["bias"]).tolist())
    assert moved["backbone"] is params["backbone"]
    # through the trainer: with a learning rate too small to move them, every ramp starts (and stays) at the mean
    model, data = tiny.make_tiny_checkpoint(tmp_path / "model"), tiny.make_tiny_glue(tmp_path / "glue")
    cfg = TrainConfig(task="stsb", model=str(model), data_dir=str(data / "STS-B"), scheme="joint", batch_size=8,
                      max_length=32, lr=1e-12, max_steps=1, output_dir=str(tmp_path / "runs"), run_name="stsb")
    run = finetune(cfg, progress=False)
    labels = [float(line.rsplit("\t", 1)[1]) for line in (data / "STS-B" / "train.tsv").read_text().splitlines()[1:]]
    trained = EarlyExitModel.from_run(run.path).params
    for i in range(3):
        np.testing.assert_allclose(np.asarray(trained["ramps"][str(i)]["classifier"]["bias"]), np.mean(labels), rtol=1e-5)
