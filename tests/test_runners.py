"""Inference runners on a real fine-tuned MiniLM: all modes agree with each other and with the
offline simulation; threshold 0 reproduces the full model; one compiled layer step."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GLUE, every_live_mode
from jaxexit.text import batches, glue
from jaxexit.exits import offline, policies, runners
from jaxexit import EarlyExitModel



def settings(cached):
    """Thresholds at quantiles of the checkpoint's own confidences (so that exits really spread over
    layers), nudged half-way between neighbouring values so that no input sits on a threshold."""
    def between(values, q):
        v = np.unique(values.ravel())
        i = min(int(q * len(v)), len(v) - 2)
        return float((v[i] + v[i + 1]) / 2)

    ent = policies.entropy(cached)
    norm = policies.normalized_entropy(cached)
    top = policies.max_prob(cached)
    return [
        ("entropy", dict(S=between(ent, 0.3))), ("entropy", dict(S=between(ent, 0.7))),
        ("pcee", dict(patience=1, tau=between(norm, 0.4))), ("pcee", dict(patience=2, tau=between(norm, 0.8))),
        ("maxprob", dict(t=between(top, 0.5))), ("maxprob", dict(t=between(top, 0.9))),
        ("pabee", dict(patience=1)), ("pabee", dict(patience=3)),
        ("static", dict(k=2)), ("static", dict(k=5)),
    ]

FULL = [("entropy", dict(S=0.0)), ("pcee", dict(patience=2, tau=0.0)), ("maxprob", dict(t=1.0)),
        ("pabee", dict(patience=6)), ("static", dict(k=6))]


@pytest.fixture(scope="module")
def setup(trained_minilm_run):
    model = EarlyExitModel.from_run(trained_minilm_run.path)
    task = glue.get_task("sst2")
    examples = glue.load_examples(task, "dev", GLUE / "SST-2")[:48]
    split = batches.encode_examples(model.tokenizer, task, examples)
    return model, split, runners.cached_logits(model, split, batch_size=16)


def _policy(model, name, params):
    return policies.make_policy(name, model.num_layers, model.config.num_labels, **params)


def test_checkpoint_round_trip(trained_minilm_run, setup):
    model, split, cached = setup
    assert model.config.num_labels == 2 and model.config.ramp_pooler == "per_ramp"
    whole = model.ramp_logits(model.tokenizer.pad(split.rows[:8], split.types[:8]))
    np.testing.assert_allclose(whole, cached[:, :8], atol=1e-5)
    assert not np.allclose(cached[0], cached[-1])  # the ramps differ


def one_length(model, split, cached):
    """The inputs of `split`'s most common length bucket (latency steps compile per length)."""
    lengths = np.array([model.tokenizer.bucket_length(len(r)) for r in split.rows])
    rows = np.flatnonzero(lengths == np.bincount(lengths).argmax())
    return split.take(rows), cached[:, rows]


# The live modes run on the inputs of one length bucket (28 of the 48, of 17 to 32 tokens, padded
# together in the batched modes): each mode compiles its steps per policy kind and input length, and
# nothing in a policy's exits depends on the length. Batches of 8 rows x 32 tokens take the plain
# steps; `every_live_mode` runs the first-token steps too.
BATCH = 8


@pytest.mark.parametrize("name,params", FULL)
def test_zero_threshold_reproduces_the_full_model(setup, name, params):
    model, split, cached = setup
    sub, _ = one_length(model, split, cached)
    full = model.final_logits(model.tokenizer.pad(sub.rows, sub.types)).argmax(-1)
    policy = _policy(model, name, params)
    warmed = ("latency, warmed up", runners.run_latency(model, policy, sub, warmup=1))
    for mode, result in [warmed, *every_live_mode(model, policy, sub, batch_size=BATCH)]:
        assert (result.exit_layer == model.num_layers).all(), f"{mode} {policy}"
        np.testing.assert_array_equal(result.prediction, full, err_msg=f"{mode} {policy}")


def test_every_mode_equals_the_offline_simulation(setup):
    model, split, cached = setup
    sub, sub_cached = one_length(model, split, cached)
    assert model.step_plan((BATCH, 32)) == (6, False, True) and len(sub) > 2 * BATCH  # plain steps; a filled batch
    spread = set()
    for name, params in settings(sub_cached):
        policy = _policy(model, name, params)
        want = offline.evaluate(policy, sub_cached)
        spread |= set(want.exit_layer.tolist())
        for mode, result in every_live_mode(model, policy, sub, batch_size=BATCH):
            np.testing.assert_array_equal(result.exit_layer, want.exit_layer, err_msg=f"{mode} {policy}")
            np.testing.assert_array_equal(result.prediction, want.prediction, err_msg=f"{mode} {policy}")
    assert len(spread) >= 4  # the settings really exit at different layers


def test_latency_on_the_first_token_steps_equals_the_offline_simulation(setup):
    model, split, cached = setup
    sub, _ = one_length(model, split, cached)
    first_token = EarlyExitModel(model.config, model.params, model.tokenizer)
    first_token.first_token_steps_from = 0
    assert first_token.step_plan((1, 8)).first_token
    want_logits = runners.cached_logits(first_token, sub, batch_size=8)
    for name, params in settings(want_logits):
        policy = _policy(model, name, params)
        want = offline.evaluate(policy, want_logits)
        result = runners.run_latency(first_token, policy, sub, warmup=0)
        np.testing.assert_array_equal(result.exit_layer, want.exit_layer, err_msg=str(policy))
        np.testing.assert_array_equal(result.prediction, want.prediction, err_msg=str(policy))
    assert len(sub) >= 8


def test_latency_runner_compiles_its_steps_once(setup):
    model, split, _ = setup
    assert model.config.ramp_input == "cls"
    lengths = {model.tokenizer.bucket_length(len(r)) for r in split.rows}
    fresh = EarlyExitModel(model.config, model.params, model.tokenizer)
    runners.run_latency(fresh, _policy(fresh, "pcee", dict(patience=2, tau=0.5)), split, warmup=0)
    # per input length, not per layer: one first call (layers 1..patience, since pcee cannot exit
    # before), one step for the layers after it up to L-1 (batch 1 takes the plain layer step) and
    # one for the last layer, which first-token ramps need at the first token only
    assert fresh.decided_head_step._cache_size() == len(lengths)
    assert fresh.decided_step._cache_size() == 2 * len(lengths)
    runners.run_latency(fresh, _policy(fresh, "pcee", dict(patience=2, tau=0.2)), split, warmup=0)
    assert fresh.decided_head_step._cache_size() == len(lengths)  # thresholds are arguments: nothing new
    assert fresh.decided_step._cache_size() == 2 * len(lengths)
    runners.run_latency(fresh, _policy(fresh, "pcee", dict(patience=3, tau=0.2)), split, warmup=0)
    assert fresh.decided_head_step._cache_size() == 2 * len(lengths)  # another patience: another first call
    assert fresh.decided_step._cache_size() == 2 * len(lengths)
    assert fresh.first_exit_step._cache_size() == fresh.exit_step._cache_size() == 0
    # static k=L: one call of every layer; mean-pooled ramps read every token of the last layer
    sub, _ = one_length(model, split, np.zeros((model.num_layers, len(split), 2)))
    mean = EarlyExitModel(model.config.replace(ramp_input="mean"), model.params, model.tokenizer)
    runners.run_latency(mean, _policy(mean, "static", dict(k=6)), sub, warmup=0)
    assert mean.decided_head_step._cache_size() == 1 and mean.decided_step._cache_size() == 0
    # the host-decision form: the plain steps (embeddings and layer 1 in one, then one step for the
    # layers up to L-1 and one for the last), whatever the policy
    host = EarlyExitModel(model.config, model.params, model.tokenizer)
    for params in (dict(patience=2, tau=0.5), dict(patience=1, tau=0.1)):
        runners.run_latency(host, _policy(host, "pcee", params), sub, warmup=0, pipelined=False)
    runners.run_latency(host, _policy(host, "static", dict(k=3)), sub, warmup=0, pipelined=False)
    assert host.first_exit_step._cache_size() == 1 and host.exit_step._cache_size() == 2
    assert host.decided_step._cache_size() == host.decided_head_step._cache_size() == 0


def test_a_shorter_first_call_gives_the_same_exits(setup):
    model, split, cached = setup
    sub, sub_cached = one_length(model, split, cached)
    singles = runners.single_inputs(model, sub)
    for name, params in (("pcee", dict(patience=3, tau=0.5)), ("static", dict(k=3))):
        policy = _policy(model, name, params)
        want = offline.evaluate(policy, sub_cached)
        for head in range(1, policies.earliest_exit(policy) + 1):
            got = [runners.exit_one(model, policy, b, head_layers=head) for b in singles]
            np.testing.assert_array_equal([layer for layer, _ in got], want.exit_layer, err_msg=f"{policy} {head}")
        with pytest.raises(ValueError, match="head_layers must be in 1"):
            runners.exit_one(model, policy, singles[0], head_layers=policies.earliest_exit(policy) + 1)
