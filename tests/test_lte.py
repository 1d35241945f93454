"""BERxiT's learning to exit: the LTE stage freezes everything else, its checkpoint round-trips, and
berxit / pcee[learned] run in every mode exactly as offline."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import tiny
from conftest import every_live_mode
from jaxexit.text import batches, glue, steps
from jaxexit.exits import offline, policies, runners
from jaxexit.training import optim
from jaxexit import EarlyExitModel, EncoderConfig
from jaxexit.exits.types import RampOutputs
from jaxexit.text.train_config import TrainConfig
from jaxexit.text.trainer import finetune


def _leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _tiny(num_labels=2):
    cfg = EncoderConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
                        max_position_embeddings=16, num_labels=num_labels, lte=True)
    return EarlyExitModel.from_config(cfg)


def _batch(n=8, t=10, regression=False, seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(t)[None] < rng.integers(3, t + 1, (n, 1))).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, 40, (n, t)), 0).astype(np.int32)
    label = rng.uniform(0, 5, n).astype(np.float32) if regression else rng.integers(0, 2, n).astype(np.int32)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": mask, "label": label,
            "weight": np.ones(n, np.float32)}


@pytest.mark.parametrize("num_labels", [2, 1])
def test_lte_stage_trains_the_lte_only_and_leaves_everything_else_bit_identical(num_labels):
    model = _tiny(num_labels)
    tx, labels = optim.make_optimizer(model.params, stage=4, num_layers=3, lr=1e-2, total_steps=10,
                                      warmup_ratio=0.0, weight_decay=0.01)
    state = {"params": model.params, "opt_state": tx.init(model.params), "step": np.int32(0)}
    step = jax.jit(lambda s, b: steps.train_step(model.config, 4, tx, labels, s, b, jax.random.key(0, impl="rbg")))
    before = _leaves(model.params)
    for i in range(3):
        state, out = step(state, _batch(seed=i, regression=num_labels == 1))
    after = _leaves(state["params"])
    for k in before:
        if "'lte'" in k:
            assert not np.array_equal(before[k], after[k]), k
        else:
            assert before[k].tobytes() == after[k].tobytes(), k  # bit-identical, not merely close
    assert out["ramp_losses"].shape == (3,) and np.isfinite(out["loss"])
    # The optimiser holds moments for the LTE's two leaves only.
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
    arrays = [p for p in paths if not p.endswith(".count")]
    assert arrays and all("'lte'" in p for p in arrays), arrays
    n_state = sum(np.size(x) for x in jax.tree_util.tree_leaves(state["opt_state"]))
    assert n_state <= 2 * (16 + 1) + 8


def test_lte_targets_and_loss_follow_berxit():
    logits = np.asarray([[[2.0, 0.0], [0.0, 2.0]]], np.float32)  # one ramp, two rows: predicts 0, 1
    target = np.asarray(steps.lte_targets(logits, np.asarray([0, 0]), regression=False))
    np.testing.assert_allclose(target, [[1 - np.exp(-0.01), 1 - np.exp(-0.99)]], rtol=1e-6)
    reg = np.asarray(steps.lte_targets(np.asarray([[[1.0], [3.0]]], np.float32), np.asarray([1.5, 1.0]), True))
    np.testing.assert_allclose(reg, [[1 - np.exp(-0.25), 1 - np.exp(-4.0)]], rtol=1e-6)
    model = _tiny()
    pooled = np.zeros((1, 2, 16), np.float32)  # sigmoid(bias 0) = 0.5 everywhere
    loss, per_ramp = steps.lte_loss(model.config, model.params["lte"], pooled, target, np.ones(2, np.float32))
    np.testing.assert_allclose(per_ramp, [np.mean((0.5 - target[0]) ** 2)], rtol=1e-6)


@pytest.fixture(scope="module")
def lte_run(tmp_path_factory):
    """A tiny joint run, then --lte-from it: the LTE stage alone, into a new run."""
    root = tmp_path_factory.mktemp("lte")
    model, data = tiny.make_tiny_checkpoint(root / "model"), tiny.make_tiny_glue(root / "glue", dev=40)
    common = dict(task="sst2", model=str(model), data_dir=str(data / "SST-2"), batch_size=8, max_length=32,
                  lr=1e-2, output_dir=str(root / "runs"), seed=3)
    base = finetune(TrainConfig(**common, scheme="joint", epochs=1.0, run_name="joint"), progress=False)
    lte = finetune(TrainConfig(**common, lte_from=str(base.path), lte_lr=1e-2, run_name="joint-lte"), progress=False)
    return root, base, lte


def test_lte_from_a_finished_run_keeps_its_model_and_adds_a_trained_lte(lte_run):
    root, base, lte = lte_run
    summary = json.loads((lte.path / "summary.json").read_text())
    assert summary["stages"] == {"4": summary["stages"]["4"]} and summary["lte_from"] == str(base.path)
    assert json.loads((lte.path / "train_config.json").read_text())["scheme"] == "joint"  # from the run
    old, new = EarlyExitModel.from_run(base.path), EarlyExitModel.from_run(lte.path)
    assert new.config.lte and not old.config.lte and set(new.params) == {"backbone", "ramps", "lte"}
    for k, v in _leaves({"backbone": old.params["backbone"], "ramps": old.params["ramps"]}).items():
        assert v.tobytes() == _leaves({"backbone": new.params["backbone"], "ramps": new.params["ramps"]})[k].tobytes()
    evals = [r for r in lte.records() if r["kind"] == "eval"]
    assert evals and len(evals[-1]["lte_mse"]["validation"]) == 3


def _split(model, n=24):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(tiny.VOCAB[5:], size=rng.integers(2, 12))) for _ in range(n)]
    rows, types = model.tokenizer.encode(texts)
    return batches.EncodedSplit(rows, types, np.zeros(n, np.int32), np.arange(n))


def test_learned_policies_run_in_every_mode_as_offline(lte_run):
    _, base, lte = lte_run
    model = EarlyExitModel.from_run(lte.path)
    split = _split(model)
    cached = runners.cached_logits(model, split, batch_size=8)
    assert isinstance(cached, RampOutputs) and cached.lte.shape == (3, 24)
    u = policies.predicted_error(cached.lte)
    t = float(np.median(u[0]))  # about half the rows predict a smaller error at ramp 1 and exit there
    settings = [policies.make_policy("berxit", 3, 2, t=t), policies.make_policy("berxit", 3, 2, t=0.0),
                policies.make_policy("berxit", 3, 2, t=1.0), policies.make_policy("berxit+ensemble", 3, 2, t=t),
                policies.make_policy("pcee[learned]", 3, 2, patience=2, tau=float(np.median(u)))]
    for policy in settings:
        want = offline.evaluate(policy, cached)
        for mode, result in every_live_mode(model, policy, split, batch_size=8):
            np.testing.assert_array_equal(result.exit_layer, want.exit_layer, err_msg=f"{mode} {policy}")
            np.testing.assert_array_equal(result.prediction, want.prediction, err_msg=f"{mode} {policy}")
    assert 1 < offline.evaluate(settings[0], cached).avg_layers < 3
    # A learned policy on a model without an LTE is refused, in every mode and offline.
    plain = EarlyExitModel.from_run(base.path)
    with pytest.raises(ValueError, match="learning-to-exit"):
        runners.run_latency(plain, settings[0], split)
    with pytest.raises(ValueError, match="learning-to-exit"):
        offline.evaluate(settings[0], runners.cached_logits(plain, split))


def test_infer_cli_berxit_and_analyze_with_an_lte(lte_run, capsys):
    from jaxexit.cli import infer as cli

    root, _, lte = lte_run
    result = cli.run(["--checkpoint", str(lte.path), "--policy", "berxit", "--t", "0.3", "--limit", "16",
                       "--json", str(root / "b.json")])
    assert result["policy"] == "berxit" and result["t"] == 0.3
    result = cli.run(["--checkpoint", str(lte.path), "--policy", "pcee", "--confidence", "learned", "--patience", "2",
                       "--tau", "0.3", "--ensemble", "--limit", "16", "--mode", "device", "--batch-size", "8",
                       "--json", str(root / "p.json")])
    assert result["policy"] == "pcee[learned]+ensemble"
    sweep = cli.run(["--checkpoint", str(lte.path), "--sweep", "--limit", "16", "--json", str(root / "s.json")])
    with open(sweep["sweep_csv"]) as f:
        assert "berxit" in f.read()
    # infer/analyze.py: BERxiT in Table 2, the -v2 variant, every policy with and without the ensemble.
    from jaxexit import analysis

    result = analysis.analyze(lte.path, root / "analysis", timing_inputs=0)
    assert result["lte"] and {r["policy"] for r in result["pcee"]} >= {"berxit"}
    assert {r["policy"] for r in result["variants"]} == {"pcee", "pcee[maxprob]", "pcee[learned]"}
    assert {r["policy"] for r in result["ensemble"]} >= {"berxit", "berxit+ensemble", "static+ensemble"}
    for name in ("pcee_variants.png", "ensemble.png", "lte.npy"):
        assert (root / "analysis" / name).is_file(), name
    text = analysis.tables([result])
    assert "| berxit |" in text and "Figure 4 form" in text and "| pcee[learned] |" in text
    assert "Figure 6 form" in text and "| berxit+ensemble |" in text
    assert glue.get_task("sst2").num_labels == 2
