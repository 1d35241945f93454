"""Exit policies: exact semantics, full-model invariants, numerics, and host == device stepping."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxexit import policies as P
from jaxexit.policies import make_policy

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


def test_maxprob_exits_strictly_above_t():
    z = one_row(UNSURE, [0.0, 2.0], SURE, SURE)
    p2 = float(P.max_prob(z[1, 0]))  # ~0.881
    assert P.simulate(make_policy("maxprob", 4, 2, t=0.8), z)[0].tolist() == [2]
    assert P.simulate(make_policy("maxprob", 4, 2, t=p2), z)[0].tolist() == [3]
    assert P.simulate(make_policy("maxprob", 4, 2, t=0.5), z)[0].tolist() == [2]  # 0.5 is not > 0.5


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


@pytest.mark.parametrize("name, params", SETTINGS + [("pcee", dict(patience=1, tau=1.0)), ("maxprob", dict(t=0.0))])
def test_no_exit_fires_at_last_layer(name, params):
    policy = make_policy(name, 6, 3, **params)
    state = P.init_state(policy, 4)
    for layer in range(1, 7):
        state, exits = P.step(policy, state, np.tile([[20.0, 0.0, 0.0]], (4, 1)), layer)
    assert not exits.any()


FULL_MODEL = [("entropy", dict(S=0.0)), ("pcee", dict(patience=1, tau=0.0)), ("pcee", dict(patience=6, tau=1.0)),
              ("maxprob", dict(t=1.0)), ("pabee", dict(patience=6)), ("pabee", dict(patience=9)),
              ("static", dict(k=6))]


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
                                          ("maxprob", dict(t=0.9))])
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
