"""Early exit on a multi-exit ResNet (jaxexit/vision/model.py) through the generic runners: every
live mode gives the offline simulation's exits and predictions, the piecewise and dense paths agree
with the whole network, and a finished run loads. A random depth-14 network (6 exits, three stages, so the block changes
shape twice) on 8x8 images."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxexit.exits import offline, policies
from jaxexit.exits.runners import (cached_logits, run_batched, run_full_batched, run_full_latency, run_latency,
                                   run_on_device)
from jaxexit.vision import resnet
from jaxexit.vision.model import VisionExitModel
from jaxexit.vision.resnet import ResNetConfig

CFG = ResNetConfig(depth=14, num_classes=3, widths=(4, 8, 16))


@pytest.fixture(scope="module")
def setup():
    variables = resnet.init_variables(CFG, jax.random.key(0), 8)
    # spread the running statistics a little, so that eval mode is not the identity
    rng = np.random.default_rng(1)
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + rng.uniform(0.0, 0.3, np.shape(x)).astype(np.float32), variables["batch_stats"])
    model = VisionExitModel(CFG, variables, class_names=("a", "b", "c"))
    pictures = np.random.default_rng(2).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    return model, pictures, cached_logits(model, pictures, batch_size=8)


def _between(values, q):
    v = np.unique(np.asarray(values).ravel())
    i = min(int(q * len(v)), len(v) - 2)
    return float((v[i] + v[i + 1]) / 2)


def test_the_steps_and_the_dense_network_equal_the_whole_network(setup):
    model, pictures, cached = setup
    whole = model.ramp_logits(model.prepare(pictures))
    assert whole.shape == (6, 20, 3)
    np.testing.assert_allclose(cached, whole, atol=1e-5)
    np.testing.assert_allclose(model.final_logits(model.prepare(pictures)), whole[-1], atol=1e-5)
    full, seconds = run_full_latency(model, pictures[:4], warmup=1)
    np.testing.assert_allclose(full, whole[-1, :4], atol=1e-5)
    assert seconds > 0
    np.testing.assert_allclose(run_full_batched(model, pictures, batch_size=8)[0], whole[-1], atol=1e-5)
    assert not np.allclose(cached[0], cached[-1])


def test_every_mode_equals_the_offline_simulation(setup):
    model, pictures, cached = setup
    L = model.num_layers
    norm, top = policies.normalized_entropy(cached), policies.max_prob(cached)
    settings = [("pcee", dict(patience=1, tau=_between(norm, 0.4))), ("pcee", dict(patience=2, tau=_between(norm, 0.8))),
                ("entropy", dict(S=_between(policies.entropy(cached), 0.5))), ("maxprob", dict(t=_between(top, 0.5))),
                ("pabee", dict(patience=1)), ("pabee", dict(patience=2)), ("static", dict(k=4)),
                ("pcee+ensemble", dict(patience=1, tau=_between(norm, 0.5)))]
    spread = set()
    for name, params in settings:
        policy = policies.make_policy(name, L, 3, **params)
        want = offline.evaluate(policy, cached)
        spread |= set(want.exit_layer.tolist())
        for mode, result in [("latency", run_latency(model, policy, pictures, warmup=0)),
                             ("batched", run_batched(model, policy, pictures, batch_size=8, warmup=0)),
                             ("device-1", run_on_device(model, policy, pictures[:6], batch_size=1, warmup=0)),
                             ("device-8", run_on_device(model, policy, pictures, batch_size=8, warmup=0))]:
            n = len(result.exit_layer)
            np.testing.assert_array_equal(result.exit_layer, want.exit_layer[:n], err_msg=f"{mode} {policy}")
            np.testing.assert_array_equal(result.prediction, want.prediction[:n], err_msg=f"{mode} {policy}")
    assert len(spread) >= 3  # the settings really exit at different blocks


def test_policies_for_another_shape_or_an_lte_are_refused(setup):
    model, pictures, _ = setup
    with pytest.raises(ValueError, match="L=12"):
        run_latency(model, policies.make_policy("pcee", 12, 3, patience=2, tau=0.5), pictures[:2])
    with pytest.raises(ValueError, match="learning-to-exit|LTE"):
        run_batched(model, policies.make_policy("berxit", 6, 3, t=0.5), pictures[:2], batch_size=2)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.prepare(pictures[0])


def test_a_trained_run_loads_and_infer_analyze_writes_table_3(tmp_path):
    """A short run on a synthetic image folder (test_vision_train's), then infer/analyze.py on it."""
    pytest.importorskip("PIL.Image", reason="the image-folder reader needs Pillow")
    import json

    from test_vision_train import _cfg, _write_folder
    from jaxexit.vision import train as vision_train

    sys_argv = ["runs/colours", "--out", str(tmp_path / "analysis"), "--timing-inputs", "6"]
    _write_folder(tmp_path / "colours", {"train": 16, "test": 8})
    result = vision_train.train(_cfg(tmp_path / "colours", tmp_path, epochs=1), progress=False)
    model = VisionExitModel.from_run(result.run.path)
    assert model.num_layers == 3 and model.class_names == ("blue", "green", "red")
    assert model.mean == tuple(result.summary["normalization"]["mean"])

    sys_argv[0] = str(result.run.path)
    analysis = _analyze_main(sys_argv)
    assert analysis["split"] == "test" and analysis["n"] == 24 and analysis["model"] == "resnet8"
    assert len(analysis["per_layer"]) == 3
    np.testing.assert_allclose([p["accuracy"] for p in analysis["per_layer"]],
                               [p["accuracy"] for p in result.summary["per_layer"]["test"]], atol=1e-6)
    assert analysis["timing"]["inputs"] == 6
    tables = (tmp_path / "analysis" / "tables.md").read_text()
    assert "PCEE-BERT Table 3 form" in tables
    row = next(line for line in tables.splitlines() if line.startswith("| CIFAR-10, resnet8 |"))
    assert row.count("|") == 2 + 6 + 1  # model, full network, PABEE and PCEE at three savings
    saved = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert saved["full_score"] == analysis["full_score"]
    for name in ("tradeoff.png", "per_layer.png", "exit_histograms.png", "wall_saving.png", "logits.npy"):
        assert (tmp_path / "analysis" / name).is_file(), name


def _analyze_main(argv):
    from jaxexit.cli import analyze

    return analyze.run(argv)  # what infer/analyze.py runs, returning the analysis
