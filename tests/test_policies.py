"""Exit policies: exact semantics, full-model invariants, numerics, and host == device stepping."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxexit.exits import policies as P
from jaxexit.exits.policies import make_policy

SURE = [0.0, 10.0]    # class 1, H ~ 5e-4 nats
UNSURE = [0.0, 0.0]   # class 0 (argmax tie -> first), H = ln 2
SURE0 = [10.0, 0.0]   # class 0, confident


def one_row(*layers):
    """Logits [L, 1, C] for one input from per-layer logit vectors."""
    return np.asarray(layers, np.float32)[:, None, :]


def random_logits(L=6, N=200, C=3, scale=3.0, seed=0):
    return (np.random.default_rng(seed).normal(size=(L, N, C)) * scale).astype(np.float32)


def run_like_runner(policy, logits):
    """The batched host runner: step the rows still present, drop the rows that exit."""
    L, N, _ = logits.shape
    active, state = np.arange(N), P.init_state(policy, N)
    exit_layer = np.full(N, L)
    for layer in range(1, L + 1):
        state, exits = P.step(policy, state, logits[layer - 1, active], layer)
        exit_layer[active[exits]] = layer
        active, state = active[~exits], P.take_rows(state, ~exits)
    return exit_layer


SETTINGS = [  # (name, params) over classification, C = 3
    ("entropy", dict(S=0.3)), ("entropy", dict(S=0.8)),
    ("pcee", dict(patience=1, tau=0.4)), ("pcee", dict(patience=2, tau=0.3)), ("pcee", dict(patience=3, tau=0.6)),
    ("maxprob", dict(t=0.7)), ("maxprob", dict(t=0.95)),
    ("pabee", dict(patience=1)), ("pabee", dict(patience=2)), ("pabee", dict(patience=4)),
    ("static", dict(k=1)), ("static", dict(k=4)),
    # PCEE-BERT-v1 and the cross-layer ensemble (same exits, other predictions)
    ("pcee[maxprob]", dict(patience=2, tau=0.8)), ("pcee[maxprob]", dict(patience=1, tau=0.95)),
    ("entropy+ensemble", dict(S=0.3)), ("pcee+ensemble", dict(patience=2, tau=0.3)),
    ("pabee+ensemble", dict(patience=2)), ("pcee[maxprob]+ensemble", dict(patience=2, tau=0.8)),
    ("margin", dict(margin=0.5)), ("margin+ensemble", dict(margin=0.2)),
]


# ---- semantics on hand-built sequences ----------------------------------------------------------
def test_entropy_exits_at_first_confident_layer_strictly_below_S():
    z = one_row(UNSURE, UNSURE, SURE, UNSURE, SURE)
    exit_layer, pred = P.simulate(make_policy("entropy", 5, 2, S=0.1), z)
    assert exit_layer.tolist() == [3] and pred.tolist() == [1]
    at_h = float(P.entropy(z[2, 0]))  # S equal to H(p_3): not strictly below, and layer 5 is L
    assert P.simulate(make_policy("entropy", 5, 2, S=at_h), z)[0].tolist() == [5]


def test_pcee_counts_consecutive_confident_layers():
    z = one_row(SURE, UNSURE, SURE, SURE0, UNSURE, SURE)
    exit_layer, pred = P.simulate(make_policy("pcee", 6, 2, patience=2, tau=0.5), z)
    assert exit_layer.tolist() == [4] and pred.tolist() == [0]  # k = 1, 0, 1, 2
    assert P.simulate(make_policy("pcee", 6, 2, patience=1, tau=0.5), z)[0].tolist() == [1]
    assert P.simulate(make_policy("pcee", 6, 2, patience=3, tau=0.5), z)[0].tolist() == [6]


@pytest.mark.parametrize("patience, expected", [(1, 1), (3, 3), (5, 5), (6, 6), (9, 6)])
def test_pcee_earliest_exit_is_layer_patience(patience, expected):
    z = one_row(*[SURE] * 6)
    assert P.simulate(make_policy("pcee", 6, 2, patience=patience, tau=0.5), z)[0].tolist() == [expected]


def test_pcee_patience_1_is_entropy_rule_on_normalised_entropy():
    z = random_logits(C=3)
    pcee = P.simulate(make_policy("pcee", 6, 3, patience=1, tau=0.45), z)[0]
    entropy = P.simulate(make_policy("entropy", 6, 3, S=0.45 * math.log(3)), z)[0]
    np.testing.assert_array_equal(pcee, entropy)


def test_pcee_maxprob_counts_layers_whose_max_probability_is_above_tau():
    weak = [0.0, 0.5]  # max p = 0.622
    z = one_row(SURE, weak, SURE, SURE0, weak, SURE)
    assert P.simulate(make_policy("pcee[maxprob]", 6, 2, patience=2, tau=0.9), z)[0].tolist() == [4]  # k = 1, 0, 1, 2
    assert P.simulate(make_policy("pcee[maxprob]", 6, 2, patience=2, tau=0.6), z)[0].tolist() == [2]  # weak counts
    at = float(P.max_prob(np.asarray([weak], np.float32))[0])  # strictly above: max p == tau is not confident
    assert P.simulate(make_policy("pcee[maxprob]", 6, 2, patience=2, tau=at), z)[0].tolist() == [4]


def test_ensemble_predicts_from_the_mean_of_ramps_up_to_the_exit_and_keeps_the_exits():
    z = one_row(SURE0, [0.0, 0.4], SURE, SURE, SURE, SURE)  # ramp 2 leans to class 1, weakly
    for base, params in [("static", dict(k=2)), ("entropy", dict(S=0.7)), ("pabee", dict(patience=3))]:
        plain = P.simulate(make_policy(base, 6, 2, **params), z)
        ens = P.simulate(make_policy(base + "+ensemble", 6, 2, **params), z)
        assert ens[0].tolist() == plain[0].tolist()
        m = int(ens[0][0])
        mean = np.mean([np.exp(P.log_softmax(z[i, 0])) for i in range(m)], axis=0)
        assert ens[1].tolist() == [int(np.argmax(mean))]
    # static k=2: ramp 2 alone says 1, the mean of ramps 1-2 says 0
    assert P.simulate(make_policy("static", 6, 2, k=2), z)[1].tolist() == [1]
    assert P.simulate(make_policy("static+ensemble", 6, 2, k=2), z)[1].tolist() == [0]
    # regression: the mean of the outputs
    r = np.asarray([[[1.0]], [[2.0]], [[4.5]]], np.float32)
    assert P.simulate(make_policy("static+ensemble", 3, 1, k=3), r)[1].tolist() == [2.5]


def test_policy_labels_name_the_variants():
    policy = make_policy("pcee[maxprob]+ensemble", 6, 2, patience=2, tau=0.9)
    assert (policy.name, policy.confidence, policy.ensemble) == ("pcee", "maxprob", True)
    assert policy.label == "pcee[maxprob]+ensemble" and str(policy) == "pcee[maxprob]+ensemble(patience=2, tau=0.9)"
    assert policy.as_dict() == {"policy": "pcee[maxprob]+ensemble", "patience": 2, "tau": 0.9}
    assert P.parse_label("entropy") == ("entropy", "entropy", False)
    for bad, match in [("entropy[maxprob]", "confidence applies to pcee only"), ("pcee[foo]", "confidence must be"),
                       ("pcee+ens", "unknown exit policy"), ("pcee[maxprob]+ensemble+ensemble", "unknown exit policy")]:
        with pytest.raises(ValueError, match=match):
            make_policy(bad, 6, 2, patience=2, tau=0.5)


def test_berxit_and_pcee_learned_read_the_lte_output():
    from jaxexit.exits.types import RampOutputs

    logits = one_row(UNSURE, UNSURE, UNSURE, UNSURE, UNSURE)  # nothing confident by the softmax
    a = np.asarray([[2.0], [-1.0], [-3.0], [-3.0], [2.0]], np.float32)  # u = sigmoid(a): .88 .27 .047 .047 .88
    z = RampOutputs(logits, a)
    assert P.simulate(make_policy("berxit", 5, 2, t=0.3), z)[0].tolist() == [2]
    assert P.simulate(make_policy("berxit", 5, 2, t=0.05), z)[0].tolist() == [3]
    assert P.simulate(make_policy("pcee[learned]", 5, 2, patience=2, tau=0.3), z)[0].tolist() == [3]
    assert P.simulate(make_policy("pcee[learned]", 5, 2, patience=2, tau=0.05), z)[0].tolist() == [4]
    for t, want in [(0.0, 5), (1.0, 1)]:  # the range ends: never, always
        assert P.simulate(make_policy("berxit", 5, 2, t=t), z)[0].tolist() == [want]
    huge = RampOutputs(logits, np.asarray([[-900.0], [900.0], [0.0], [0.0], [0.0]], np.float32))
    assert P.simulate(make_policy("berxit", 5, 2, t=1.0), huge)[0].tolist() == [1]  # u(-900) is inside (0, 1)
    assert P.simulate(make_policy("berxit", 5, 2, t=0.0), huge)[0].tolist() == [5]
    u = P.predicted_error(np.asarray([-900.0, 0.0, 900.0], np.float32))
    assert 0.0 < u[0] and u[1] == 0.5 and u[2] < 1.0
    assert P.simulate(make_policy("pcee[learned]", 3, 1, patience=1, tau=0.5),  # regression: allowed
                      RampOutputs(np.zeros((3, 1, 1), np.float32), np.asarray([[1.0], [-1.0], [0.0]], np.float32)))[0] == [2]
    with pytest.raises(ValueError, match="learning-to-exit"):
        P.simulate(make_policy("berxit", 5, 2, t=0.3), logits)
    from jaxexit.exits import offline
    with pytest.raises(ValueError, match="learning-to-exit"):
        offline.evaluate(make_policy("pcee[learned]", 5, 2, patience=2, tau=0.3), logits)


@pytest.mark.parametrize("label, params", [("berxit", dict(t=0.3)), ("pcee[learned]", dict(patience=2, tau=0.4)),
                                           ("berxit+ensemble", dict(t=0.5)), ("berxit", dict(t=0.0))])
def test_learned_policies_on_the_device_equal_the_host(label, params):
    from jaxexit.exits.types import RampOutputs

    z = RampOutputs(random_logits(), (np.random.default_rng(5).normal(size=(6, 200)) * 2).astype(np.float32))
    policy = make_policy(label, 6, 3, **params)
    exit_layer, pred = jax.jit(P.scan_exits)(policy, z)
    want_layer, want_pred = P.simulate(policy, z)
    np.testing.assert_array_equal(np.asarray(exit_layer), want_layer)
    np.testing.assert_array_equal(np.asarray(pred), want_pred)
    from jaxexit.exits import offline
    np.testing.assert_array_equal(offline.exit_layers(policy, z), want_layer)


def test_maxprob_exits_strictly_above_t():
    z = one_row(UNSURE, [0.0, 2.0], SURE, SURE)
    p2 = float(P.max_prob(z[1, 0]))  # ~0.881
    assert P.simulate(make_policy("maxprob", 4, 2, t=0.8), z)[0].tolist() == [2]
    assert P.simulate(make_policy("maxprob", 4, 2, t=p2), z)[0].tolist() == [3]
    assert P.simulate(make_policy("maxprob", 4, 2, t=0.5), z)[0].tolist() == [2]  # 0.5 is not > 0.5


def test_margin_exits_when_the_top_two_probabilities_are_more_than_margin_apart():
    z = one_row([1.0, 1.0, 0.0], [0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0])
    gap = float(P.top2_margin(z[1, 0]))  # e^2 - e over e^0 + e^1 + e^2, ~0.4223
    assert math.isclose(gap, (math.e ** 2 - math.e) / (1 + math.e + math.e ** 2), rel_tol=1e-12)
    assert P.simulate(make_policy("margin", 4, 3, margin=0.4), z)[0].tolist() == [2]
    assert P.simulate(make_policy("margin", 4, 3, margin=gap), z)[0].tolist() == [3]  # strictly above
    assert P.simulate(make_policy("margin", 4, 3, margin=0.0), z)[0].tolist() == [2]  # layer 1's top two tie
    assert P.earliest_exit(make_policy("margin", 4, 3, margin=0.5)) == 1


def test_policy_flags_come_from_the_registry():
    import argparse

    from jaxexit.cli import policy_flags

    parser = argparse.ArgumentParser()
    policy_flags.add_policy_flags(parser)
    assert set(policy_flags.PARAM_FLAGS) == set(P.PARAM_NAMES) >= {"patience", "tau", "S", "t", "delta", "k", "margin"}

    def policy(*argv, C=3):
        args = parser.parse_args(list(argv))
        params = {k: getattr(args, k) for k in policy_flags.PARAM_FLAGS}
        return policy_flags.policy_from_args(args.policy, params, 6, C, args.confidence, args.ensemble)

    assert str(policy("--policy", "margin", "--margin", "0.5")) == "margin(margin=0.5)"
    assert str(policy("--margin", "0.25", "--ensemble")) == "margin+ensemble(margin=0.25)"  # --margin names it
    assert str(policy("--t", "0.5")) == "maxprob(t=0.5)" and str(policy("--max-prob", "0.5")) == "maxprob(t=0.5)"
    assert str(policy("--policy", "berxit", "--t", "0.5")).startswith("berxit(t=0.5)")
    assert str(policy("--entropy", "0.2")) == "entropy(S=0.2)" and str(policy("--tau", "0.2")) == "pcee(patience=1, tau=0.2)"
    assert str(policy("--patience", "2", "--delta", "0.1", C=1)) == "pabee(delta=0.1, patience=2)"
    with pytest.raises(ValueError, match="unexpected \\['t'\\]"):
        policy("--policy", "margin", "--t", "0.5")
    with pytest.raises(ValueError, match="do not name one policy"):
        policy("--margin", "0.5", "--t", "0.5")
    with pytest.raises(ValueError, match="regression"):
        policy("--margin", "0.5", C=1)


def test_pabee_counts_unchanged_predictions():
    z = one_row(SURE0, SURE, SURE, SURE, SURE0, SURE0, SURE0, SURE0)  # argmax 0 1 1 1 0 0 0 0
    exit_layer, pred = P.simulate(make_policy("pabee", 8, 2, patience=2), z)
    assert exit_layer.tolist() == [4] and pred.tolist() == [1]  # counter 0 0 1 2
    assert P.simulate(make_policy("pabee", 8, 2, patience=3), z)[0].tolist() == [8]  # 0 0 1 2 0 1 2 (3 at L)


@pytest.mark.parametrize("patience, expected", [(1, 2), (2, 3), (4, 5), (5, 6), (6, 6), (10, 6)])
def test_pabee_earliest_exit_is_layer_patience_plus_1(patience, expected):
    z = one_row(*[UNSURE] * 6)  # the same prediction (and uncertain: pabee ignores confidence)
    assert P.simulate(make_policy("pabee", 6, 2, patience=patience), z)[0].tolist() == [expected]


def test_pabee_regression_agrees_within_delta():
    z = one_row([1.0], [1.05], [1.3], [1.32], [1.33], [2.0])
    exit_layer, pred = P.simulate(make_policy("pabee", 6, 1, patience=2, delta=0.1), z)
    assert exit_layer.tolist() == [5]  # agree at 2; reset at 3 (0.25); agree at 4, 5
    np.testing.assert_allclose(pred, [1.33], rtol=1e-6)
    assert P.simulate(make_policy("pabee", 6, 1, patience=1, delta=0.1), z)[0].tolist() == [2]
    assert P.simulate(make_policy("pabee", 6, 1, patience=1, delta=0.0), z)[0].tolist() == [6]
    same = one_row(*[[0.5]] * 4)  # |0| < delta needs delta > 0
    assert P.simulate(make_policy("pabee", 4, 1, patience=1, delta=0.0), same)[0].tolist() == [4]
    assert P.simulate(make_policy("pabee", 4, 1, patience=1, delta=1e-6), same)[0].tolist() == [2]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_static_exits_everyone_at_k(k):
    exit_layer, pred = P.simulate(make_policy("static", 5, 3, k=k), random_logits(L=5))
    assert set(exit_layer.tolist()) == {k}
    np.testing.assert_array_equal(pred, random_logits(L=5)[k - 1].argmax(-1))


@pytest.mark.parametrize("name, params", SETTINGS + [("pcee", dict(patience=9, tau=0.5)), ("static", dict(k=6))])
def test_earliest_exit_is_the_first_layer_any_row_can_exit_at(name, params):
    # the pipelined latency runner runs the layers before it in one call: a bound that is never
    # beaten on any logits, and reached by rows confident and unchanged from layer 1 on
    policy = make_policy(name, 6, 3, **params)
    first = P.earliest_exit(policy)
    for seed in range(3):
        assert P.simulate(policy, random_logits(seed=seed))[0].min() >= first
    sure = one_row(*[[0.0, 0.0, 12.0]] * 6)
    assert P.simulate(policy, sure)[0].tolist() == [first]
    assert P.reads_every_ramp(policy) == (policy.name in ("pcee", "pabee") or policy.ensemble)


@pytest.mark.parametrize("name, params", SETTINGS + [("pcee", dict(patience=1, tau=1.0)), ("maxprob", dict(t=0.0))])
def test_no_exit_fires_at_last_layer(name, params):
    policy = make_policy(name, 6, 3, **params)
    state = P.init_state(policy, 4)
    for layer in range(1, 7):
        state, exits = P.step(policy, state, np.tile([[20.0, 0.0, 0.0]], (4, 1)), layer)
    assert not exits.any()


FULL_MODEL = [("entropy", dict(S=0.0)), ("pcee", dict(patience=1, tau=0.0)), ("pcee", dict(patience=6, tau=1.0)),
              ("maxprob", dict(t=1.0)), ("pabee", dict(patience=6)), ("pabee", dict(patience=9)),
              ("static", dict(k=6)), ("margin", dict(margin=1.0))]


@pytest.mark.parametrize("name, params", FULL_MODEL)
def test_zero_threshold_or_long_patience_reproduces_full_model(name, params):
    z = random_logits(C=3)
    z[:, :20] = np.where(np.arange(3) == 1, 1e4, -1e4)  # exactly one-hot: H = 0, max p = 1
    z[:, 20:40] = 0.0  # ties everywhere
    exit_layer, pred = P.simulate(make_policy(name, 6, 3, **params), z)
    assert (exit_layer == 6).all()
    np.testing.assert_array_equal(pred, z[-1].argmax(-1))


# ---- numerics -----------------------------------------------------------------------------------
EXTREME = np.array([[1e4, -1e4, 0.0], [1e4, 1e4, 1e4], [0.0, -np.inf, -np.inf], [-1e30, 0.0, -1e30],
                    [3e38, -3e38, 0.0], [-1e4, -1e4, -1e4 + 1], [0.0, 0.0, 0.0]], np.float32)


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_measures_are_finite_for_extreme_logits(xp):
    with warnings.catch_warnings(), np.errstate(divide="raise", invalid="raise", over="raise"):
        warnings.simplefilter("error")
        h, c, m = (np.asarray(f(xp.asarray(EXTREME), xp)) for f in (P.entropy, P.normalized_entropy, P.max_prob))
    assert np.isfinite(h).all() and np.isfinite(c).all() and np.isfinite(m).all()
    g = np.asarray(P.top2_margin(xp.asarray(EXTREME), xp))
    assert g.tolist()[:5] + g.tolist()[6:] == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0] and 0 < g[5] < 1
    assert (h >= 0).all() and (h <= math.log(3) + 1e-6).all() and (m <= 1).all() and (m >= 1 / 3 - 1e-6).all()
    assert h[[0, 2, 3, 4]].tolist() == [0.0] * 4 and m[[0, 2, 3, 4]].tolist() == [1.0] * 4  # exactly one-hot
    np.testing.assert_allclose(h[[1, 6]], math.log(3), rtol=1e-6)


def test_policies_step_without_nan_on_extreme_logits():
    z = np.broadcast_to(EXTREME, (6,) + EXTREME.shape)
    for name, params in SETTINGS + FULL_MODEL:
        exit_layer, pred = P.simulate(make_policy(name, 6, 3, **params), z)
        assert ((exit_layer >= 1) & (exit_layer <= 6)).all()


# ---- host stepping on a shrinking batch ---------------------------------------------------------
@pytest.mark.parametrize("name, params", SETTINGS)
def test_host_step_on_remaining_rows_equals_stepping_all_rows(name, params):
    z = random_logits()
    policy = make_policy(name, 6, 3, **params)
    np.testing.assert_array_equal(run_like_runner(policy, z), P.simulate(policy, z)[0])


def test_step_on_a_row_subset_equals_the_subset_of_stepping_all():
    z, rows = random_logits(), np.random.default_rng(1).permutation(200)[:57]
    for name, params in SETTINGS:
        policy = make_policy(name, 6, 3, **params)
        whole, part = P.init_state(policy, 200), P.init_state(policy, 57)
        for layer in range(1, 7):
            whole, exits = P.step(policy, whole, z[layer - 1], layer)
            part, sub = P.step(policy, part, z[layer - 1, rows], layer)
            np.testing.assert_array_equal(sub, exits[rows])
            for key in whole:
                np.testing.assert_array_equal(part[key], whole[key][rows])


# ---- the same step on the device ----------------------------------------------------------------
@pytest.mark.parametrize("name, params", SETTINGS + FULL_MODEL)
def test_jitted_scan_of_jnp_step_equals_numpy_stepping(name, params):
    z = random_logits()
    policy = make_policy(name, 6, 3, **params)
    exit_layer, pred = jax.jit(P.scan_exits)(policy, z)
    want_layer, want_pred = P.simulate(policy, z)
    np.testing.assert_array_equal(np.asarray(exit_layer), want_layer)
    np.testing.assert_array_equal(np.asarray(pred), want_pred)


@pytest.mark.parametrize("params", [dict(patience=1, delta=0.5), dict(patience=2, delta=1.5),
                                    dict(patience=6, delta=9.0)])
def test_jitted_regression_pabee_equals_numpy_stepping(params):
    z = random_logits(C=1, scale=1.0)
    policy = make_policy("pabee", 6, 1, **params)
    exit_layer, pred = jax.jit(P.scan_exits)(policy, z)
    want_layer, want_pred = P.simulate(policy, z)
    np.testing.assert_array_equal(np.asarray(exit_layer), want_layer)
    np.testing.assert_allclose(np.asarray(pred), want_pred, rtol=1e-6)


@pytest.mark.parametrize("name, params", SETTINGS)
def test_step_inside_jitted_while_loop_stops_when_all_rows_exit(name, params):
    z = random_logits(N=64)
    policy = make_policy(name, 6, 3, **params)

    @jax.jit
    def device_loop(policy, logits):
        L, N, _ = logits.shape

        def unfinished(carry):
            layer, _, exit_layer = carry
            return (layer <= L) & (exit_layer == 0).any()

        def body(carry):
            layer, state, exit_layer = carry
            state, exits = P.step(policy, state, logits[layer - 1], layer, jnp)
            return layer + 1, state, P.first_exit(exit_layer, exits, layer, jnp)

        carry = (jnp.int32(1), P.init_state(policy, N, jnp), jnp.zeros(N, jnp.int32))
        layers_run, _, exit_layer = lax.while_loop(unfinished, body, carry)
        return layers_run - 1, jnp.where(exit_layer == 0, L, exit_layer)

    layers_run, exit_layer = device_loop(policy, z)
    want = P.simulate(policy, z)[0]
    np.testing.assert_array_equal(np.asarray(exit_layer), want)
    assert int(layers_run) == want.max()  # the loop stopped after the last row's exit layer


def test_new_thresholds_reuse_the_compiled_loop():
    traces = []

    @jax.jit
    def exits(policy, logits):
        traces.append(1)
        return P.scan_exits(policy, logits)

    z = random_logits()
    for tau in (0.1, 0.3, 0.5):
        for patience in (1, 2):
            policy = make_policy("pcee", 6, 3, patience=patience, tau=tau)
            np.testing.assert_array_equal(np.asarray(exits(policy, z)[0]), P.simulate(policy, z)[0])
    assert len(traces) == 1


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params", [("entropy", dict(S=0.1)), ("pcee", dict(patience=2, tau=0.1)),
                                          ("maxprob", dict(t=0.9)), ("margin", dict(margin=0.5))])
def test_softmax_policies_refuse_regression(name, params):
    with pytest.raises(ValueError, match="regression"):
        make_policy(name, 6, 1, **params)


@pytest.mark.parametrize("name, C, params, match", [
    ("entropy", 2, dict(S=-0.1), "S must be"),
    ("entropy", 2, dict(S=float("nan")), "S must be"),
    ("pcee", 2, dict(patience=2, tau=1.1), "tau must be"),
    ("pcee", 2, dict(patience=2, tau=-0.1), "tau must be"),
    ("pcee", 2, dict(patience=0, tau=0.5), "patience must be"),
    ("pcee", 2, dict(patience=1.5, tau=0.5), "patience must be an integer"),
    ("maxprob", 2, dict(t=1.5), "t must be"),
    ("maxprob", 2, dict(t=-0.5), "t must be"),
    ("pabee", 2, dict(patience=0), "patience must be"),
    ("pabee", 2, dict(patience=2, delta=0.1), "regression only"),
    ("pabee", 1, dict(patience=2), "missing \\['delta'\\]"),
    ("pabee", 1, dict(patience=2, delta=-1.0), "delta must be"),
    ("static", 2, dict(k=0), "k must be"),
    ("static", 2, dict(k=7), "k must be"),
    ("static", 2, dict(k=True), "k must be an integer"),
    ("entropy", 2, dict(S=0.1, tau=0.2), "unexpected \\['tau'\\]"),
    ("entropy", 2, dict(), "missing \\['S'\\]"),
    ("deebert", 2, dict(S=0.1), "unknown exit policy"),
    ("margin", 2, dict(margin=1.5), "margin must be in \\[0.0, 1.0\\]"),
    ("margin", 2, dict(t=0.5), "unexpected \\['t'\\]"),
])
def test_out_of_range_settings_are_clear_errors(name, C, params, match):
    with pytest.raises(ValueError, match=match):
        make_policy(name, 6, C, **params)


def test_step_rejects_wrong_shapes_and_layers():
    policy = make_policy("entropy", 6, 3, S=0.1)
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        P.step(policy, {}, np.zeros((4, 2)), 1)
    with pytest.raises(ValueError, match="layer must be"):
        P.step(policy, {}, np.zeros((4, 3)), 7)
    with pytest.raises(ValueError, match="do not match"):
        P.simulate(policy, np.zeros((5, 4, 3)))


def test_policy_is_a_hashable_record():
    policy = make_policy("pcee", 12, 2, tau=0.2, patience=2)
    assert policy == make_policy("pcee", 12, 2, patience=2, tau=0.2) and hash(policy)
    assert policy["tau"] == 0.2 and policy.as_dict() == {"policy": "pcee", "patience": 2, "tau": 0.2}
    assert str(policy) == "pcee(patience=2, tau=0.2)"


# ---- the ends of every threshold range: one precision in every mode (docs/policies.md) -------
def near_uniform_logits(L=6, N=1000, C=2, seed=0):
    """Ramp outputs ~1e-3 apart (an untrained or unsure ramp), plus rows that are exactly uniform
    at some layers and rows one float32 ulp from uniform."""
    z = (np.random.default_rng(seed).normal(size=(L, N, C)) * 1e-3).astype(np.float32)
    z[:, :40] = 0.25  # exactly uniform at every layer
    z[::2, 40:80] = -3.0  # exactly uniform at odd layers only
    z[:, 80:120] = np.float32(0.5)
    z[:, 80:120, 0] = np.nextafter(np.float32(0.5), np.float32(1))  # one ulp apart
    return z


def range_ends(name, L, C):
    """Both ends of `name`'s parameter range, the values its default sweep grid starts and ends with,
    at every patience where the policy has one."""
    from jaxexit.exits import offline

    grid = offline.default_grid(name, L, C)
    values = {"entropy": [dict(S=0.0), dict(S=math.log(C))], "pcee": [dict(tau=0.0), dict(tau=1.0)],
              "pcee[maxprob]": [dict(tau=1.0 / C), dict(tau=1.0)],
              "maxprob": [dict(t=1.0 / C), dict(t=1.0)], "pabee": [{} if C > 1 else dict(delta=0.0)], "static": [dict(k=1), dict(k=L)],
              "margin": [dict(margin=0.0), dict(margin=1.0)]}[name]
    ends = [grid[0], grid[-1]] + [dict(v, patience=p) if name.startswith(("pcee", "pabee")) else v
                                  for v in values for p in (1, 2, L)]
    return [make_policy(name, L, C, **params) for params in ends]


def device_exits_in_chunks(policy, logits, rows):
    """The policy stepped inside a jitted lax.while_loop, `rows` inputs at a time (other shapes than
    the host's), as the on-device runner does."""
    @jax.jit
    def loop(policy, z):
        L, N, _ = z.shape

        def body(carry):
            layer, state, exit_layer = carry
            state, exits = P.step(policy, state, z[layer - 1], layer, jnp)
            return layer + 1, state, P.first_exit(exit_layer, exits, layer, jnp)

        carry = (jnp.int32(1), P.init_state(policy, N, jnp), jnp.zeros(N, jnp.int32))
        _, _, exit_layer = lax.while_loop(lambda c: (c[0] <= L) & (c[2] == 0).any(), body, carry)
        return jnp.where(exit_layer == 0, L, exit_layer)

    return np.concatenate([np.asarray(loop(policy, logits[:, i:i + rows])) for i in range(0, logits.shape[1], rows)])


@pytest.mark.parametrize("C", [2, 3])
@pytest.mark.parametrize("name", ["entropy", "pcee", "maxprob", "pabee", "static", "pcee[maxprob]", "margin"])
def test_range_ends_give_identical_exits_on_host_device_and_offline(name, C):
    from jaxexit.exits import offline

    z = near_uniform_logits(C=C)
    for policy in range_ends(name, 6, C):
        host, _ = P.simulate(policy, z)
        np.testing.assert_array_equal(offline.exit_layers(policy, z), host, err_msg=f"offline {policy}")
        np.testing.assert_array_equal(np.asarray(jax.jit(P.scan_exits)(policy, z)[0]), host, err_msg=f"scan {policy}")
        np.testing.assert_array_equal(device_exits_in_chunks(policy, z, 8), host, err_msg=f"while_loop {policy}")
        np.testing.assert_array_equal(run_like_runner(policy, z), host, err_msg=f"shrinking batch {policy}")


@pytest.mark.parametrize("C", [2, 3])
def test_range_ends_mean_what_exact_arithmetic_says(C):
    """At S = ln C, tau = 1 and t = 1 / C every row exits at layer 1 unless its logits are exactly
    uniform there (rows 0-79 here; margin = 0: unless its top two logits tie, as every uniform row's
    do); at S = 0, tau = 0, t = 1 and margin = 1 nobody exits."""
    z = near_uniform_logits(C=C)
    uniform_at_1 = np.zeros(z.shape[1], bool)
    uniform_at_1[:80] = True  # rows 40-79 are uniform at layers 1, 3, 5
    for name, params in [("entropy", dict(S=math.log(C))), ("pcee", dict(patience=1, tau=1.0)),
                         ("maxprob", dict(t=1.0 / C)), ("margin", dict(margin=0.0))]:
        exit_layer, _ = P.simulate(make_policy(name, 6, C, **params), z)
        np.testing.assert_array_equal(exit_layer[~uniform_at_1], 1)
        np.testing.assert_array_equal(exit_layer[:40], 6)  # uniform everywhere: never confident
        np.testing.assert_array_equal(exit_layer[40:80], 2)  # confident at layer 2, not uniform there
    for name, params in [("entropy", dict(S=0.0)), ("pcee", dict(patience=1, tau=0.0)), ("maxprob", dict(t=1.0)),
                         ("margin", dict(margin=1.0))]:
        assert (P.simulate(make_policy(name, 6, C, **params), z)[0] == 6).all()


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
@pytest.mark.parametrize("C", range(2, 11))
def test_uniform_rows_sit_exactly_on_the_range_end_and_others_strictly_inside(xp, C):
    rows = np.zeros((3, C), np.float32)
    rows[0] = 0.37  # uniform
    rows[1] = 0.5
    rows[1, 0] = np.nextafter(np.float32(0.5), np.float32(1.0))  # one ulp from uniform (not a denormal:
    #                                                                XLA flushes those to zero)
    rows[2] = np.random.default_rng(C).normal(size=C) * 1e-7
    measures = (P.entropy, P.normalized_entropy, P.max_prob, P.top2_margin)
    h, c, m, g = (np.asarray(f(xp.asarray(rows), xp)) for f in measures)
    assert h.dtype == c.dtype == m.dtype == g.dtype == np.float64
    assert (h[0], c[0], m[0], g[0]) == (math.log(C), 1.0, 1.0 / C, 0.0)
    assert (h[1:] < math.log(C)).all() and (c[1:] < 1.0).all() and (m[1:] > 1.0 / C).all() and (g[1:] > 0).all()
    rows[2, :2] = rows[2].max()  # the top two tie: margin exactly 0 (exact arithmetic), uniform or not
    assert np.asarray(P.top2_margin(xp.asarray(rows), xp))[2] == 0.0


def test_thresholds_reach_the_device_at_float64():
    """A threshold between two float64 neighbours that float32 cannot tell apart still decides on the
    device exactly as on the host (a float32 leaf would round 0.3 to 0.30000001192...)."""
    z = np.full((2, 4, 2), 0.0, np.float32)
    z[0, :, 1] = [0.1, 0.2, 0.3, 0.4]
    for t in (0.5249791874789399, float(P.max_prob(z[0])[0]), math.nextafter(float(P.max_prob(z[0])[0]), 0.0)):
        policy = make_policy("maxprob", 2, 2, t=t)
        np.testing.assert_array_equal(np.asarray(jax.jit(P.scan_exits)(policy, z)[0]), P.simulate(policy, z)[0])


def test_policy_leaves_round_trip_through_tree_map():
    policy = make_policy("pcee", 6, 2, patience=2, tau=0.30000000000000004)
    again = jax.tree_util.tree_map(np.asarray, policy)
    assert again["tau"] == 0.30000000000000004 and again["patience"] == 2
    assert jax.tree_util.tree_map(jnp.asarray, policy)["tau"] == policy["tau"]
