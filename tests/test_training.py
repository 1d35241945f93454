"""Training: what each stage trains and freezes, the optimiser partition, resuming, data parallelism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import tiny
from conftest import REPO
from jaxexit.training import optim
from jaxexit.text import steps
from jaxexit import EarlyExitModel, EncoderConfig
from jaxexit.training.checkpoint import RunDir, Stopped
from jaxexit.training.losses import ramp_losses
from jaxexit.training.stages import Stage
from jaxexit.text.train_config import TrainConfig
from jaxexit.text.trainer import finetune


def _leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_params(got: RunDir, expected: RunDir) -> None:
    """The two runs' final parameters, bit for bit."""
    a, b = _leaves(got.load_params()), _leaves(expected.load_params())
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _tiny_model(**overrides):
    fields = dict(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                  intermediate_size=24, max_position_embeddings=16, num_labels=2)
    fields.update(overrides)
    return EarlyExitModel.from_config(EncoderConfig(**fields))


def _batch(n=8, t=10, regression=False, seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(t)[None] < rng.integers(3, t + 1, (n, 1))).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, 40, (n, t)), 0).astype(np.int32)
    label = rng.uniform(0, 5, n).astype(np.float32) if regression else rng.integers(0, 2, n).astype(np.int32)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": mask,
            "label": label, "weight": np.ones(n, np.float32)}


def _run_steps(model, stage, n=3, every=False, **overrides):
    """(state, metrics) after `n` steps; with `every`, the state after each step (one compilation)."""
    tx, labels = optim.make_optimizer(model.params, stage=stage, num_layers=model.num_layers, lr=1e-2,
                                      total_steps=10, warmup_ratio=0.0, weight_decay=0.01, **overrides)
    state = {"params": model.params, "opt_state": tx.init(model.params), "step": np.int32(0)}
    step = jax.jit(lambda s, b, r: steps.train_step(model.config, stage, tx, labels, s, b, r))
    states = []
    for i in range(n):
        state, out = step(state, _batch(seed=i, regression=model.config.is_regression), jax.random.key(0, impl="rbg"))
        states.append(state)
    return states if every else (state, out)


# ---- what each stage trains ------------------------------------------------------------------
@pytest.mark.parametrize("pooler", ["per_ramp", "shared"])
def test_stage2_leaves_backbone_and_last_ramp_bit_identical(pooler):
    model = _tiny_model(ramp_pooler=pooler)
    before = _leaves(model.params)
    state, _ = _run_steps(model, stage=2)
    after = _leaves(state["params"])
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    frozen = {k for k in before if "'backbone'" in k or "'ramps']['2']" in k or "['pooler']['dense']" in k and pooler == "shared"}
    assert frozen and not (changed & frozen)
    for k in frozen:  # bit-identical, not merely close
        assert before[k].tobytes() == after[k].tobytes(), k
    trained = {k for k in before if "'ramps']['0']" in k or "'ramps']['1']" in k}
    assert trained <= changed | {k for k in trained if "bias" in k and "pooler" in k}  # everything else moved
    assert any("classifier" in k for k in changed)


def test_stage2_optimizer_state_holds_nothing_for_frozen_parameters():
    model = _tiny_model()
    tx, _ = optim.make_optimizer(model.params, stage=2, num_layers=3, lr=1e-3, total_steps=10,
                                 warmup_ratio=0.1, weight_decay=0.01)
    state = tx.init(model.params)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    arrays = [p for p in paths if not p.endswith(".count")]
    assert arrays and all("'ramps']['0']" in p or "'ramps']['1']" in p for p in arrays), arrays
    n_state = sum(np.size(x) for x in jax.tree_util.tree_leaves(state))
    n_trainable = sum(np.size(v) for k, v in _leaves(model.params).items() if "'ramps']['0']" in k or "'ramps']['1']" in k)
    assert n_state <= 2 * n_trainable + 8  # adam's mu and nu for the trainable ramps, a few counters


def test_stage1_trains_backbone_and_last_ramp_only():
    model = _tiny_model()
    before = _leaves(model.params)
    state, out = _run_steps(model, stage=1)
    after = _leaves(state["params"])
    for k in before:
        moved = not np.array_equal(before[k], after[k])
        if "'ramps']['0']" in k or "'ramps']['1']" in k:
            assert not moved, k
    assert not np.array_equal(before["['backbone']['layer']['0']['output']['dense']['kernel']"],
                              after["['backbone']['layer']['0']['output']['dense']['kernel']"])
    assert out["ramp_losses"].shape == (1,)


def test_joint_loss_weights_ramps_by_depth():
    model = _tiny_model(num_labels=1)  # regression: MSE
    batch = _batch(regression=True)
    loss, losses = steps.stage_loss(model.config, 0, model.params, batch, jax.random.key(0, impl="rbg"))
    assert losses.shape == (3,)
    np.testing.assert_allclose(loss, (1 * losses[0] + 2 * losses[1] + 3 * losses[2]) / 6, rtol=1e-6)
    state, _ = _run_steps(model, stage=0)
    changed = [k for k, v in _leaves(state["params"]).items() if not np.array_equal(v, _leaves(model.params)[k])]
    assert any("'ramps']['0']" in k for k in changed) and any("backbone" in k for k in changed)


def test_alternate_loss_is_the_last_ramps_at_even_steps_and_every_ramps_sum_at_odd():
    model = _tiny_model()
    batch, key = _batch(), jax.random.key(0, impl="rbg")
    for step in (0, 1, 2, 7):
        loss, losses = steps.stage_loss(model.config, 3, model.params, batch, key, np.int32(step))
        joint, same = steps.stage_loss(model.config, 0, model.params, batch, key)
        np.testing.assert_array_equal(losses, same)  # one forward pass, every ramp's loss
        np.testing.assert_allclose(loss, losses[-1] if step % 2 == 0 else losses.sum(), rtol=1e-6)
    # Step 0 (even) updates ramp L and the backbone, not ramps 1..L-1 (their gradient is zero there;
    # AdamW's decay does move their kernels, so compare biases); step 1 moves every ramp.
    before = _leaves(model.params)
    changed = lambda state: {k for k, v in _leaves(state["params"]).items()  # noqa: E731
                             if "bias" in k and not np.array_equal(v, before[k])}
    after_one, after_two = _run_steps(model, stage=3, n=2, every=True)
    first = changed(after_one)
    assert any("'ramps']['2']" in k for k in first) and any("backbone" in k for k in first)
    assert not any("'ramps']['0']" in k or "'ramps']['1']" in k for k in first)
    second = changed(after_two)
    assert any("'ramps']['0']" in k for k in second) and any("'ramps']['1']" in k for k in second)


def test_ramp_losses_cross_entropy_and_weights():
    logits = np.array([[[2.0, 0.0], [0.0, 3.0], [5.0, 5.0]]], np.float32)
    labels = np.array([0, 1, 0])
    weights = np.array([1.0, 1.0, 0.0], np.float32)  # the third row is padding
    got = ramp_losses(logits, labels, weights, regression=False)
    want = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-3.0))) / 2
    np.testing.assert_allclose(got, [want], rtol=1e-6)


def test_stages_keep_the_values_runs_record():
    """Checkpoints and metrics.jsonl hold the stage as a bare integer: 0 joint, 1 and 2 DeeBERT's,
    3 alternate, 4 learning to exit."""
    assert [int(s) for s in Stage] == [0, 1, 2, 3, 4]
    assert TrainConfig(scheme="two_stage").stages == (Stage.BACKBONE, Stage.RAMPS) == (1, 2)
    assert TrainConfig(scheme="joint", lte=True).stages == (0, 4) and TrainConfig(scheme="alternate").stages == (3,)
    assert TrainConfig(stage1_from="run").stages == (2,) and TrainConfig(lte_from="run").stages == (4,)
    assert json.dumps({"stage": Stage.RAMPS}) == '{"stage": 2}' and Stage.RAMPS.title == "stage 2"


def test_training_library_layering():
    """jaxexit/training imports neither model stack; the training library parses no arguments and
    imports nothing of jaxexit.cli."""
    import ast

    for package in ("training", "text", "vision"):
        for path in (REPO / "jaxexit" / package).glob("*.py"):
            names = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names.add(node.module)
            assert "argparse" not in names and not any(n.startswith("jaxexit.cli") for n in names), path
            if package == "training":
                assert not any(n.startswith(("jaxexit.text", "jaxexit.vision")) for n in names), path


# ---- the optimiser partition -----------------------------------------------------------------
def test_labels_cover_every_parameter_and_decay_skips_bias_and_layernorm():
    params = _tiny_model(ramp_pooler="shared").params
    for stage in (0, 1, 2):
        labels = _leaves(optim.param_labels(params, stage, 3))
        assert set(map(str, labels.values())) <= {"trainable", "frozen"}
    stage2 = _leaves(optim.param_labels(params, 2, 3))
    assert stage2["['ramps']['pooler']['dense']['kernel']"] == "frozen"  # shared pooler: trained in stage 1
    assert stage2["['ramps']['1']['classifier']['kernel']"] == "trainable"
    decay = _leaves(optim.decay_mask(params))
    assert not decay["['backbone']['embeddings']['LayerNorm']['scale']"]
    assert not decay["['backbone']['layer']['0']['attention']['self']['query']['bias']"]
    assert decay["['backbone']['layer']['0']['attention']['self']['query']['kernel']"]
    with pytest.raises(ValueError, match="no training rule covers"):
        optim.param_labels({"other": {"w": np.zeros(2)}}, 1, 3)


def test_schedule_warms_up_then_decays_to_zero():
    sched = optim.schedule(1.0, total_steps=100, warmup_ratio=0.1)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(5)) == pytest.approx(0.5) and float(sched(55)) == pytest.approx(0.5)
    assert float(sched(100)) == pytest.approx(0.0)


def test_set_to_zero_partition_differs_from_masked_adamw():
    """Why freezing uses multi_transform: optax.masked passes raw gradients for unmasked leaves."""
    params = {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}
    grads = {"a": np.full(2, 3.0, np.float32), "b": np.full(2, 3.0, np.float32)}
    masked = optax.masked(optax.adam(0.1), {"a": True, "b": False})
    updates, _ = masked.update(grads, masked.init(params), params)
    assert np.all(updates["b"] == 3.0)  # the raw gradient would be applied to a "frozen" leaf
    tx = optax.multi_transform({"trainable": optax.adam(0.1), "frozen": optax.set_to_zero()},
                               {"a": "trainable", "b": "frozen"})
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(updates["b"] == 0.0)


# ---- end to end: tiny model, both schemes, resume, several devices ---------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny.make_tiny_checkpoint(root / "model"), tiny.make_tiny_glue(root / "glue")


# The short joint runs below take JOINT_STEPS steps: the learning-rate schedule is compiled into the
# training step, so runs of one length share one compiled step (through the session's XLA cache).
JOINT_STEPS = 8


def _cfg(tiny_setup, tmp_path, **overrides):
    model, data = tiny_setup
    fields = dict(task="sst2", model=str(model), data_dir=str(data), batch_size=8, eval_batch_size=16, max_length=32,
                  lr=1e-2, epochs=3.0, output_dir=str(tmp_path / "runs"), save_every=3, log_every=1, seed=7)
    fields.update(overrides)
    return TrainConfig(**fields)


@pytest.mark.parametrize("scheme,task", [("two_stage", "sst2"), ("joint", "sst2"), ("joint", "stsb"),
                                         ("alternate", "sst2")])
def test_tiny_end_to_end(tiny_setup, tmp_path, scheme, task):
    # checkpoints at epoch ends only (a checkpoint costs more than a tiny step; resuming is tested below)
    run = finetune(_cfg(tiny_setup, tmp_path, scheme=scheme, task=task, run_name="r", save_every=1000), progress=False)
    summary = json.loads((run.path / "summary.json").read_text())
    split = summary["per_layer"]["validation"]
    assert len(split) == 3 and summary["checkpoint_rule"] == "last step"
    assert set(split[-1]) == ({"pearson", "spearman"} if task == "stsb" else {"accuracy"})
    assert (run.path / "layers.csv").read_text().startswith("layer,validation_")
    records = run.records()
    stages = {r["stage"] for r in records if r["kind"] == "train"}
    assert stages == {"two_stage": {1, 2}, "joint": {0}, "alternate": {3}}[scheme]
    assert sum(r["kind"] == "eval" for r in records) >= 2  # after every epoch
    assert (tmp_path / "runs" / "LATEST").read_text().strip() == "r"
    assert run.has_model() and (run.path / "tokenizer").is_dir()
    params = run.load_params()
    assert set(params) == {"backbone", "ramps"}
    if task == "sst2" and scheme != "two_stage":  # the cue words are learnable: the last ramp must learn them
        assert split[-1]["accuracy"] >= 0.8, split


def test_existing_run_directory_is_not_overwritten(tiny_setup, tmp_path):
    finetune(_cfg(tiny_setup, tmp_path, run_name="r", max_steps=JOINT_STEPS, scheme="joint"), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(_cfg(tiny_setup, tmp_path, run_name="r", max_steps=JOINT_STEPS, scheme="joint"), progress=False)


def test_stage1_from_reruns_stage2_only_on_a_finished_run(tiny_setup, tmp_path):
    """`stage1_from`: backbone and ramp L come from the finished run bit for bit, ramps 1..L-1
    start fresh and train, and only stage 2 runs."""
    first = finetune(_cfg(tiny_setup, tmp_path, run_name="first", max_steps=4), progress=False)
    again = finetune(_cfg(tiny_setup, tmp_path, run_name="again", max_steps=4, stage2_lr=5e-2,
                          stage1_from=str(first.path)), progress=False)
    assert {r["stage"] for r in again.records() if r["kind"] == "train"} == {2}
    a, b = _leaves(first.load_params()), _leaves(again.load_params())
    fresh = _leaves(EarlyExitModel.from_pretrained(tiny_setup[0], seed=7).params)
    for k in a:
        if "'backbone'" in k or "'ramps']['2']" in k:
            assert a[k].tobytes() == b[k].tobytes(), k
        elif "classifier']['kernel" in k:  # retrained from a fresh start, not from the first run's ramps
            assert not np.array_equal(a[k], b[k]) and not np.array_equal(fresh[k], b[k]), k
    assert json.loads((again.path / "summary.json").read_text())["stage1_from"] == str(first.path)
    with pytest.raises(ValueError, match="does not fit"):
        finetune(_cfg(tiny_setup, tmp_path, run_name="other", task="stsb", max_steps=1, stage1_from=str(first.path)),
                 progress=False)
    assert not (tmp_path / "runs" / "other").exists()  # refused before a run directory was made
    with pytest.raises(ValueError, match="two_stage"):
        _cfg(tiny_setup, tmp_path, scheme="joint", stage1_from=str(first.path))


def test_resume_builds_everything_from_the_saved_config(tiny_setup, tmp_path):
    """`--resume` with another preset on the command line (as `finetune.py --resume DIR` without
    `--config`): task, data and model come from the run's saved config."""
    cfg = _cfg(tiny_setup, tmp_path, run_name="saved", max_steps=JOINT_STEPS, scheme="joint")
    run = finetune(cfg, progress=False)
    other = _cfg(tiny_setup, tmp_path, task="stsb", run_name="other", max_steps=JOINT_STEPS, scheme="joint")
    again = finetune(other, resume=str(run.path), progress=False)
    summary = json.loads((again.path / "summary.json").read_text())
    assert again.path == run.path and summary["task"] == "sst2"
    assert set(summary["final_ramp"]["validation"]) == {"accuracy"}
    assert not (tmp_path / "runs" / "other").exists()


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from jaxexit.text.train_config import TrainConfig
from jaxexit.text import trainer
cfg = TrainConfig.from_dict({cfg!r})
def kill(run, stage, step):
    if stage == 1 and step == {kill_at}:
        run.wait()  # the checkpoint of step {saved} is committed
        os.kill(os.getpid(), signal.SIGKILL)
trainer.finetune(cfg, progress=False, on_step=kill)
"""


def test_killed_run_resumes_to_the_same_parameters(tiny_setup, tmp_path):
    """Kill a run mid-epoch (SIGKILL, after step 5, last checkpoint at step 3); resume it; compare
    with an uninterrupted run of the same seed."""
    cfg = _cfg(tiny_setup, tmp_path, run_name="killed", epochs=1.0)  # 25 steps an epoch, stage 1 and 2
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), cfg=cfg.to_dict(), kill_at=5, saved=3)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    killed = RunDir(tmp_path / "runs" / "killed")
    assert not killed.has_model() and killed.latest_meta()["step"] == 3
    resumed = finetune(cfg, resume=str(killed.path), progress=False)
    straight = finetune(cfg.replace(run_name="straight"), progress=False)
    _assert_same_params(resumed, straight)
    steps_logged = [r["step"] for r in resumed.records() if r["kind"] == "train" and r["stage"] == 1]
    assert steps_logged == sorted(set(steps_logged))  # records past the checkpoint were dropped, not duplicated


def test_ctrl_c_saves_the_step_and_the_run_resumes_exactly(tiny_setup, tmp_path):
    """Ctrl-C (SIGINT) during step 5 of 8 (checkpoints every 3 steps): the run saves step 5,
    raises `Stopped` and restores the previous handler; resumed, it ends with the parameters of an
    uninterrupted run."""
    cfg = _cfg(tiny_setup, tmp_path, run_name="stopped", scheme="joint", max_steps=JOINT_STEPS)
    before = signal.getsignal(signal.SIGINT)

    def interrupt(run, stage, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Stopped, match="SIGINT at step 5.*--resume"):
        finetune(cfg, progress=False, on_step=interrupt)
    assert signal.getsignal(signal.SIGINT) is before
    stopped = RunDir(tmp_path / "runs" / "stopped")
    assert not stopped.has_model() and stopped.latest_meta()["step"] == 5
    resumed = finetune(cfg, resume=str(stopped.path), progress=False)
    straight = finetune(cfg.replace(run_name="straight"), progress=False)
    _assert_same_params(resumed, straight)


DEVICES_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
from jaxexit.text.train_config import TrainConfig
from jaxexit.text import trainer
run = trainer.finetune(TrainConfig.from_dict({cfg!r}), progress=False)
losses = [r["loss"] for r in run.records() if r["kind"] == "train"]
print(json.dumps({{"devices": jax.device_count(), "losses": losses}}))
"""


def _losses_on(devices: int, cfg: TrainConfig) -> list[float]:
    """The run's training losses on `devices` host devices: in this process when it has that many
    (it has one CPU device unless the environment says otherwise), else in a subprocess (the device
    count is fixed when JAX starts)."""
    if jax.device_count() == devices and jax.default_backend() == "cpu":
        run = finetune(cfg, progress=False)
        return [r["loss"] for r in run.records() if r["kind"] == "train"]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = DEVICES_SCRIPT.format(tests=str(REPO / "tests"), cfg=cfg.to_dict())
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == devices
    return result["losses"]


def test_four_host_devices_give_the_same_loss_as_one(tiny_setup, tmp_path):
    one, four = (_losses_on(devices, _cfg(tiny_setup, tmp_path, run_name=f"d{devices}", scheme="joint",
                                          max_steps=JOINT_STEPS)) for devices in (1, 4))
    assert len(one) == JOINT_STEPS
    np.testing.assert_allclose(four, one, rtol=2e-5, atol=1e-6)


# ---- a short real training run ------------------------------------------------------------------
def test_minilm_short_real_training(trained_minilm_run):
    """A few dozen real steps on SST-2: the final ramp must beat chance on dev (MiniLM learns slowly
    from its first token, hence the high learning rate of the fixture)."""
    run = trained_minilm_run
    summary = json.loads((run.path / "summary.json").read_text())
    per_layer = summary["per_layer"]["validation"]
    assert len(per_layer) == 6
    # Chance is about 0.5; PyTorch's BertForSequenceClassification reaches 0.74 on the same 40 steps.
    assert per_layer[-1]["accuracy"] > 0.65, per_layer
    stage1_losses = [r["loss"] for r in run.records() if r["kind"] == "train" and r["stage"] == 1]
    assert stage1_losses[-1] < stage1_losses[0]
