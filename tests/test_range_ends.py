"""Every runner at the ends of every policy's threshold range, on a model whose ramps are unsure.

Near-uniform ramp outputs are common (untrained or unsure ramps), and the ends of the ranges
(S = ln C, tau = 1, t = 1 / C, and 0 / 1 at the other end) are in every sweep grid. docs/policies.md:
every thresholded measure is computed at one precision in every mode, so latency, batched, device
and offline modes must give identical exits there.
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from conftest import every_live_mode
from test_policies import range_ends
from jaxexit.exits import offline, policies, runners
from jaxexit import EarlyExitModel
from jaxexit.text.batches import EncodedSplit


# Each of the two ways a threshold is compared: in numpy on the host (latency with host decisions,
# batched), and in jnp on the device (pipelined latency, the device loop). Batch 1 on the device
# and the first-token steps differ from these only in how the logits are made, which
# tests/test_runners.py checks on every policy kind; here they would only add compilations.
RANGE_END_MODES = ("latency", "latency, host decisions", "batched", "device-8")


def unsure_model(tmp_path, num_labels: int) -> EarlyExitModel:
    """A tiny BERT (3 layers: each patience compiles its own first call, so the fewest that put a
    layer before and after the uniform ramp) whose ramps output logits ~1e-3 apart; ramp 2's are
    exactly uniform."""
    directory = tiny.make_tiny_checkpoint(tmp_path / "ckpt", layers=3)
    model = EarlyExitModel.from_pretrained(directory, num_labels=num_labels)
    params = model.params
    ramps = dict(params["ramps"])
    for i in range(model.num_layers):
        classifier = {k: np.asarray(v) for k, v in ramps[str(i)]["classifier"].items()}
        classifier["kernel"] = classifier["kernel"] * (0.0 if i == 1 else 0.02)
        classifier["bias"] = np.full_like(classifier["bias"], 0.3)
        ramps[str(i)] = {**ramps[str(i)], "classifier": classifier}
    return EarlyExitModel(model.config, {"backbone": params["backbone"], "ramps": ramps}, model.tokenizer)


def inputs(model: EarlyExitModel, n: int = 24) -> EncodedSplit:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(tiny.VOCAB[5:], size=rng.integers(2, 12))) for _ in range(n)]
    rows, types = model.tokenizer.encode(texts)
    return EncodedSplit(rows, types, np.zeros(n, np.int32), np.arange(n))


@pytest.mark.parametrize("num_labels", [2, 3, 1])
def test_every_mode_gives_identical_exits_at_the_ends_of_every_range(tmp_path, num_labels):
    model = unsure_model(tmp_path, num_labels)
    split = inputs(model)
    cached = runners.cached_logits(model, split, batch_size=8)
    if num_labels > 1:  # unsure ramps, as intended
        spread = np.ptp(cached, axis=-1)
        assert (spread[1] == 0).all() and 0 < spread[[0, 2]].max() < 0.05
    names = offline.applicable(num_labels) + (("pcee[maxprob]",) if num_labels > 1 else ())
    settings = [p for name in names for p in range_ends(name, model.num_layers, num_labels)]
    # the cross-layer ensemble: the same exits, predictions from the mean of ramps 1..m, in every mode
    settings += [policies.make_policy(p.label + "+ensemble", p.num_layers, p.num_labels, **dict(p.params))
                 for name in names for p in range_ends(name, model.num_layers, num_labels)[1:2]]
    for policy in dict.fromkeys(settings):  # once each: without a patience, range_ends repeats a setting
        want = offline.evaluate(policy, cached)
        np.testing.assert_array_equal(policies.simulate(policy, cached)[0], want.exit_layer)
        for mode, result in every_live_mode(model, policy, split, batch_size=8, modes=RANGE_END_MODES):
            np.testing.assert_array_equal(result.exit_layer, want.exit_layer, err_msg=f"{mode} {policy}")
            if num_labels > 1:
                np.testing.assert_array_equal(result.prediction, want.prediction, err_msg=f"{mode} {policy}")
            else:
                np.testing.assert_allclose(result.prediction, want.prediction, rtol=1e-5, err_msg=f"{mode} {policy}")
