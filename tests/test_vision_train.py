"""Training the multi-exit ResNet (jaxexit/vision/train.py, train/train_vision.py): the joint loss,
the optimiser's decay mask and schedules, a short run on a learnable synthetic image folder, exact
resume, the run directory and `load_run`, and command-line errors. A depth-8 network (3 exits) on
8x8 images, a dozen steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxexit.cli import train_vision as vision_cli
from jaxexit.vision import resnet, train as vision_train
from jaxexit.training.losses import joint_weights
from jaxexit.training.checkpoint import RunDir, Stopped
from jaxexit.vision.config import VisionTrainConfig
from jaxexit.vision.train import OptimizerSpec

Image = pytest.importorskip("PIL.Image", reason="the image-folder reader needs Pillow")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"blue": (40, 60, 200), "green": (50, 190, 60), "red": (210, 50, 40)}  # class = colour


def _write_folder(root, per_class: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                noise = rng.integers(-40, 41, (8, 8, 3))
                pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    _write_folder(root, {"train": 16, "test": 8})  # 48 train images: 6 steps an epoch at batch 8
    return root


def _cfg(folder, tmp_path, **overrides) -> VisionTrainConfig:
    fields = {"data_dir": str(folder), "depth": 8, "batch_size": 8, "eval_batch_size": 16, "epochs": 2, "lr": 0.05,
              "save_every": 4, "log_every": 1, "seed": 3, "output_dir": str(tmp_path / "runs"), "run_name": "straight"}
    fields.update(overrides)
    return VisionTrainConfig(**fields)


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory):
    """An uninterrupted 12-step run (2 epochs)."""
    return vision_train.train(_cfg(folder, tmp_path_factory.mktemp("straight")), progress=False)


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_variables(got, expected) -> None:
    """The same leaves, bit for bit."""
    a, b = _leaves(got), _leaves(expected)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- the loss and the optimiser ------------------------------------------------------------------

def test_joint_loss_weights_exits_by_depth():
    np.testing.assert_allclose(joint_weights(27), np.arange(1, 28) / 378, rtol=1e-6)
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(4, 5, 3)).astype(np.float32), rng.integers(0, 3, 5).astype(np.int32)
    loss, losses = vision_train.joint_loss(jnp.asarray(logits), jnp.asarray(labels))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -logp[:, np.arange(5), labels].mean(axis=1)  # each exit's cross-entropy, mean over the batch
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    np.testing.assert_allclose(loss, (np.arange(1, 5) / 10 * expected).sum(), rtol=1e-5)


def test_weight_decay_applies_to_kernels_only():
    cfg = resnet.ResNetConfig(depth=8, num_classes=3, widths=(2, 4, 4))
    params = jax.eval_shape(lambda: resnet.init_variables(cfg, jax.random.key(0, impl="rbg"), 8))["params"]
    mask = _leaves(vision_train.decay_mask(params))
    decayed = sorted(k for k, v in mask.items() if v)
    kept = sorted(k for k, v in mask.items() if not v)
    assert decayed and all(k.endswith("['kernel']") for k in decayed)
    assert any("['conv1']" in k for k in decayed) and any("['classifier']" in k for k in decayed)
    assert kept and all(k.endswith(("['scale']", "['bias']")) for k in kept)
    assert any("['bn1']['scale']" in k for k in kept) and any("['classifier']['bias']" in k for k in kept)
    assert len(decayed) == 3 * 2 + 1 + 3  # 2 convs per block, the stem's, 3 exit kernels

    # With zero gradients and a fresh momentum, one step moves kernels by -lr * wd * p and nothing else.
    values = {"kernel": jnp.full((2, 2), 2.0), "bn": {"scale": jnp.ones(2), "bias": jnp.full(2, 0.5)}}
    tx = OptimizerSpec(lr=0.1, momentum=0.9, weight_decay=1e-2, schedule="cosine", total_steps=10).make()
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, values), tx.init(values), values)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 1e-2 * 2.0, rtol=1e-6)
    assert not np.asarray(updates["bn"]["scale"]).any() and not np.asarray(updates["bn"]["bias"]).any()


def test_schedules():
    cosine = OptimizerSpec(0.1, 0.9, 1e-4, "cosine", 100).learning_rate()
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(50)) == pytest.approx(0.05)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-9)
    step = OptimizerSpec(0.1, 0.9, 1e-4, "step", 100).learning_rate()
    assert [round(float(step(s)), 6) for s in (0, 49, 50, 74, 75, 99)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


# ---- a short run -------------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_learns_the_colours(straight):
    losses = [r["loss"] for r in straight.run.records() if r["kind"] == "train"]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    assert straight.summary["final_ramp"]["test"]["accuracy"] >= 0.9, straight.summary["per_layer"]
    assert sum(r["kind"] == "eval" for r in straight.run.records()) == 2  # after every epoch
    lrs = [r["lr"] for r in straight.run.records() if r["kind"] == "train"]
    assert lrs[0] == pytest.approx(0.05) and lrs == sorted(lrs, reverse=True)  # cosine over the 12 steps


def test_eval_mode_uses_running_statistics(straight):
    cfg, variables = straight.model_config, straight.variables
    stats = _leaves(variables["batch_stats"])
    assert any(k.endswith("['mean']") and np.abs(v).max() > 0.01 for k, v in stats.items())  # moved from 0
    x = np.random.default_rng(1).normal(size=(6, 8, 8, 3)).astype(np.float32)
    together = np.asarray(vision_train.eval_logits(cfg, variables, x))
    again = np.asarray(vision_train.eval_logits(cfg, variables, x))
    np.testing.assert_array_equal(together, again)  # deterministic
    # An image's logits do not depend on the rest of its batch (the batch's statistics are not used) ...
    other = x.copy()
    other[1:] = 10 * other[1:] + 3
    np.testing.assert_allclose(np.asarray(vision_train.eval_logits(cfg, variables, other))[:, 0], together[:, 0],
                               rtol=1e-5, atol=1e-5)
    # ... but they do depend on the running statistics.
    shifted = {**variables, "batch_stats": jax.tree_util.tree_map(lambda v: v + 0.5, variables["batch_stats"])}
    assert not np.allclose(np.asarray(vision_train.eval_logits(cfg, shifted, x)), together)


class _Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_variables(folder, tmp_path, straight):
    """Stop a run after step 5 (last checkpoint: step 4, mid-epoch); resume it; the final
    parameters, running statistics and test accuracies equal the uninterrupted run's exactly."""
    cfg = _cfg(folder, tmp_path, run_name="interrupted")

    def stop(run, step):
        if step == 5:
            run.wait()
            raise _Interrupted

    with pytest.raises(_Interrupted):
        vision_train.train(cfg, progress=False, on_step=stop)
    path = tmp_path / "runs" / "interrupted"
    assert not (path / "summary.json").exists() and not (path / "model").exists()
    resumed = vision_train.train(None, resume=str(path), progress=False)
    _assert_same_variables(resumed.variables, straight.variables)
    assert resumed.summary["per_layer"] == straight.summary["per_layer"]
    logged = [r["step"] for r in resumed.run.records() if r["kind"] == "train"]
    assert logged == list(range(1, 13))  # the records of step 5 (past the checkpoint) were dropped, not repeated


def test_sigterm_saves_the_step_and_the_run_resumes_exactly(folder, tmp_path, straight, capsys):
    """SIGTERM during step 5 (checkpoints at 4, 6, 8): the run saves step 5 and raises `Stopped`;
    resumed, it ends with the uninterrupted run's variables. The command line says so and exits 130."""
    cfg = _cfg(folder, tmp_path, run_name="terminated")
    before = signal.getsignal(signal.SIGTERM)

    def terminate(run, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Stopped, match="SIGTERM at step 5") as stopped:
        vision_train.train(cfg, progress=False, on_step=terminate)
    assert signal.getsignal(signal.SIGTERM) is before
    path = tmp_path / "runs" / "terminated"
    assert RunDir(path).latest_meta()["step"] == 5 and not (path / "summary.json").exists()
    resumed = vision_train.train(None, resume=str(path), progress=False)
    _assert_same_variables(resumed.variables, straight.variables)

    with mock.patch.object(vision_cli, "train", side_effect=stopped.value), pytest.raises(SystemExit) as out:
        vision_cli.main(["--resume", str(path), "--no-progress"])
    assert out.value.code == 130
    assert f"--resume {path}" in capsys.readouterr().err


def test_handoff_packs_an_unfinished_run_that_the_script_then_resumes(folder, tmp_path, straight):
    """results/train_vision.sh in a scratch checkout: `pack` keeps the run directory with only its
    latest finished checkpoint; on a machine without runs/ the script unpacks it and resumes it,
    and the run ends with the uninterrupted run's variables exactly."""
    root = tmp_path / "repo"
    (root / "results").mkdir(parents=True)
    (root / "results" / "train_vision.sh").write_text(open(os.path.join(REPO, "results", "train_vision.sh")).read())
    for name in ("train", "infer", "jaxexit"):
        (root / name).symlink_to(os.path.join(REPO, name))
    (root / "data" / "cifar10" / "train").mkdir(parents=True)  # "already extracted": the script skips the tar
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(  # the real interpreter, except the analysis (its own tests cover it)
        f'#!/bin/sh\nif [ "$1" = infer/analyze.py ]; then echo "$@" >> "{tmp_path}/analyze"; exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n')
    (shim / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    script = lambda *args: subprocess.run(["bash", str(root / "results" / "train_vision.sh"), *args],  # noqa: E731
                                          env=env, capture_output=True, text=True, timeout=600)

    assert script("pack").returncode == 1  # nothing to pack yet
    assert script("bogus").returncode == 2
    cfg = _cfg(folder, tmp_path, run_name="cifar10-resnet56", output_dir=str(root / "runs"))

    def stop(run, step):
        if step == 9:  # checkpoints at steps 4, 6 (epoch end) and 8; two kept
            run.wait()
            raise _Interrupted

    with pytest.raises(_Interrupted):
        vision_train.train(cfg, progress=False, on_step=stop)
    run_dir = root / "runs" / "cifar10-resnet56"
    (run_dir / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()  # a save cut short: never packed
    packed = script("pack")
    assert packed.returncode == 0, packed.stdout + packed.stderr
    assert "at step 8" in packed.stdout
    with tarfile.open(root / "handoff" / "cifar10-resnet56.tar.gz") as tar:
        names = tar.getnames()
    assert {n.split("/")[2] for n in names if n.startswith("cifar10-resnet56/checkpoints/")} == {"8"}
    for name in ("train_config.json", "resnet_config.json", "metrics.jsonl"):
        assert f"cifar10-resnet56/{name}" in names

    shutil.rmtree(root / "runs")  # a new machine: only the committed handoff is left
    resumed = script()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "unpacked handoff/cifar10-resnet56.tar.gz" in resumed.stdout
    _, variables = vision_train.load_run(run_dir)
    _assert_same_variables(variables, straight.variables)
    assert (tmp_path / "analyze").read_text().split()[:2] == ["infer/analyze.py", "runs/cifar10-resnet56"]
    assert "git rm handoff/cifar10-resnet56.tar.gz" in resumed.stdout  # the handoff has served
    again = script()
    assert "finished: skipped" in again.stdout and "git rm" in again.stdout  # a finished run is not trained again


def test_run_directory_and_load_run(straight, folder):
    path = straight.run.path
    for name in ("train_config.json", "resnet_config.json", "metrics.jsonl", "layers.csv", "summary.json"):
        assert (path / name).is_file(), name
    assert (path / "model").is_dir() and (path / "checkpoints").is_dir()
    assert VisionTrainConfig.from_dict(json.loads((path / "train_config.json").read_text())) == straight.config
    summary = json.loads((path / "summary.json").read_text())
    assert summary["exits"] == 3 and summary["class_names"] == sorted(COLOURS) and summary["steps"] == 12
    assert len(summary["per_layer"]["test"]) == 3 and summary["command"] and summary["wall_time_s"] > 0
    assert (path / "layers.csv").read_text().splitlines()[0] == "layer,test_accuracy"
    assert len((path / "layers.csv").read_text().splitlines()) == 4

    cfg, variables = vision_train.load_run(path)
    assert cfg == straight.model_config
    x = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(vision_train.eval_logits(cfg, variables, x)),
                                  np.asarray(vision_train.eval_logits(cfg, straight.variables, x)))
    with pytest.raises(FileNotFoundError, match="not a train/train_vision.py run"):
        vision_train.load_run(folder)


def test_an_existing_run_is_not_overwritten(straight):
    cfg = straight.config
    with pytest.raises(FileExistsError, match="--resume"):
        vision_train.train(cfg, progress=False)


def test_without_a_data_dir_the_data_comes_from_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        pytest.skip(f"tensorflow-datasets not importable: {e}")
    with tfds.testing.mock_data(num_examples=12):
        data = vision_train.load_data(VisionTrainConfig(dataset="cifar100", max_eval_examples=5))
    assert data.source == "tfds cifar100" and len(data.class_names) == 100
    assert data.train_images.shape == (12, 32, 32, 3) and data.test_images.shape == (5, 32, 32, 3)
    assert data.train_labels.dtype == np.int32 and data.train_labels.max() < 100


def test_subsets_keep_every_class():
    assert vision_train.spread(10, 0).tolist() == list(range(10))
    assert vision_train.spread(30, 3).tolist() == [0, 10, 20]
    assert vision_train.spread(5, 9).tolist() == list(range(5))


# ---- the command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--data-dir", "{missing}"], r"--data-dir .*missing does not exist"),
    (["--epochs", "0"], r"--epochs must be >= 1, got 0"),
    (["--epochs", "two"], r"argument --epochs: expected int, got 'two'"),
    (["--depth", "57"], r"--depth 57 is not 6n \+ 2"),
    (["--config", "imagenet"], r"unknown config 'imagenet'"),
    (["--schedule", "linear"], r"expected one of cosine, step"),
    (["--batch-size", "100"], r"--batch-size 100 is larger than the 48 training images"),
])
def test_cli_errors_are_one_line(flags, message, folder, tmp_path, capsys):
    argv = [f.format(missing=tmp_path / "missing") for f in flags]
    argv += [] if "--data-dir" in argv else ["--data-dir", str(folder)]
    argv += [] if "--depth" in argv else ["--depth", "8"]
    with pytest.raises(SystemExit) as exit_info:
        vision_cli.main(argv + ["--output-dir", str(tmp_path / "runs"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


def test_cli_refuses_a_batch_the_devices_do_not_divide(folder, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train", "train_vision.py"), "--data-dir", str(folder),
                           "--depth", "8", "--batch-size", "8", "--output-dir", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: batch size 8 is not divisible by the 3 devices"


def test_two_devices_train_as_one_and_the_run_loads_on_one(folder, tmp_path, straight):
    """Data parallel over 2 host devices (a subprocess): the batch, BatchNorm's statistics included,
    is the global one, so the run follows the 1-device run up to float rounding; its model, saved
    from 2 devices, loads here on 1."""
    cfg = straight.config
    flags = ["--data-dir", str(folder), "--depth", "8", "--batch-size", "8", "--eval-batch-size", "16", "--epochs", "2",
             "--lr", str(cfg.lr), "--save-every", "4", "--log-every", "1", "--seed", str(cfg.seed),
             "--output-dir", str(tmp_path / "runs"), "--run-name", "two", "--no-progress"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train", "train_vision.py"), *flags],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layer  test_accuracy" in proc.stdout and "run directory: " in proc.stdout
    summary = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert summary["devices"] == 2
    model_cfg, variables = vision_train.load_run(tmp_path / "runs" / "two")
    assert model_cfg == straight.model_config
    a, b = _leaves(variables), _leaves(straight.variables)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    records = [json.loads(line) for line in (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]
    two_losses = [r["loss"] for r in records if r["kind"] == "train"]
    np.testing.assert_allclose(two_losses, [r["loss"] for r in straight.run.records() if r["kind"] == "train"],
                               rtol=1e-4)
