"""Risk-controlled calibration (`jaxexit.exits.risk`): p-values against scipy, fixed-sequence
testing, the sequences each policy is walked along, the guarantee on synthetic outputs with a known
true risk, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from jaxexit.exits import offline, policies, risk


# ---- p-values and bounds ---------------------------------------------------------------------------
@pytest.mark.parametrize("n, eps", [(1, 0.3), (20, 0.05), (436, 0.02), (5000, 0.01), (40000, 0.5)])
def test_binomial_p_values_equal_scipys_binomial_tail(n, eps):
    k = np.unique(np.linspace(0, n, 25).astype(int))
    got = risk.p_values(k, n, eps, "binomial")
    want = stats.binom.cdf(k, n, eps)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)


def test_hoeffding_bentkus_is_the_smaller_of_its_two_bounds_and_above_the_binomial_tail():
    n, eps = 500, 0.05
    k = np.arange(0, 60)
    rate = k / n
    a = np.minimum(rate, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(a > 0, a * np.log(a / eps), 0.0) + (1 - a) * np.log((1 - a) / (1 - eps))
    want = np.minimum(1.0, np.minimum(np.exp(-n * kl), math.e * stats.binom.cdf(k, n, eps)))
    got = risk.p_values(k, n, eps, "hb")
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert np.all(got >= risk.p_values(k, n, eps, "binomial") - 1e-15)  # more conservative
    assert got[-1] == 1.0  # k / n above eps: no evidence at all


@pytest.mark.parametrize("method", risk.BOUNDS)
def test_the_upper_bound_is_where_the_p_value_crosses_the_level(method):
    n, level = 400, 0.05
    for k in (0, 3, 17, 120):
        u = risk.upper_bound(k, n, level, method)
        assert k / n <= u <= 1
        assert risk.p_values([k], n, u, method)[0] <= level + 1e-12
        assert risk.p_values([k], n, u - 1e-6, method)[0] > level
    if method == "binomial":  # Clopper-Pearson's one-sided upper bound
        assert risk.upper_bound(5, 100, 0.1) == pytest.approx(stats.beta.ppf(0.9, 6, 95), rel=1e-7)


def test_min_inputs_is_where_a_riskless_setting_first_passes():
    need = risk.min_inputs(0.02, 0.1)
    assert need == 114
    assert risk.p_values([0], need, 0.02)[0] <= 0.1 < risk.p_values([0], need - 1, 0.02)[0]


def test_fixed_sequence_stops_at_the_first_hypothesis_not_rejected():
    assert risk.fixed_sequence([0.01, 0.02, 0.5, 0.01], 0.05) == 2  # the last is never reached
    assert risk.fixed_sequence([0.2, 0.01], 0.05) == 0
    assert risk.fixed_sequence([0.01, 0.05], 0.05) == 2  # p <= level rejects
    assert risk.fixed_sequence([], 0.05) == 0


def test_choose_takes_the_largest_saving_among_the_certified_and_splits_delta_over_sequences():
    n, eps, delta = 1000, 0.05, 0.1
    counts = np.array([0, 10, 30, 80, 0, 20, 60])  # two sequences: 0..3 and 4..6
    savings = np.array([0.0, 0.2, 0.4, 0.6, 0.0, 0.5, 0.7])
    best, rejected = risk.choose(counts, savings, [range(0, 4), range(4, 7)], n, eps, delta)
    # at delta / 2: k = 30 of 1000 passes at eps 0.05 (p ~ 1e-3), 80 does not; k = 60 does not
    assert rejected == 3 + 2 and best == 5
    # a lone failure early in a sequence hides everything after it
    counts2 = np.array([0, 90, 10, 10])
    best2, rejected2 = risk.choose(counts2, savings[:4], [range(4)], n, eps, delta)
    assert (best2, rejected2) == (0, 1)


# ---- sequences ---------------------------------------------------------------------------------------
def _saving(label, setting, logits):
    L, _, C = logits.shape
    return offline.evaluate(policies.make_policy(label, L, C, **setting), logits).saving


@pytest.mark.parametrize("label", ["entropy", "maxprob", "margin", "static", "pabee", "pcee", "pcee[maxprob]",
                                   "entropy+ensemble"])
def test_every_sequence_starts_at_the_full_model_and_saves_more_outward(label):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 300, 3)) * np.linspace(0.5, 4, 6)[:, None, None]).astype(np.float32)
    order = risk.sequences(label, 6, 3)
    name = policies.parse_label(label)[0]
    assert len(order) == (5 if name == "pcee" else 1)  # pcee: one sequence per patience 1..L-1
    for seq in order:
        savings = [_saving(label, s, logits) for s in seq]
        assert savings[0] == 0.0, f"{label} {seq[0]} is not the full model"
        assert np.all(np.diff(savings) >= -1e-12), f"{label}: saving falls along {seq[:3]}..."
        assert savings[-1] > 0.0


def test_sequences_hold_fixed_parameters_and_walk_the_open_one():
    by_tau = risk.sequences("pcee", 6, 2, fixed={"patience": 2})
    assert len(by_tau) == 1 and all(s["patience"] == 2 for s in by_tau[0])
    by_patience = risk.sequences("pcee", 6, 2, fixed={"tau": 0.25})
    assert [s["patience"] for s in by_patience[0]] == [5, 4, 3, 2, 1]  # safest (longest patience) first
    regression = risk.sequences("pabee", 6, 1)
    assert len(regression) == 6 and [s["delta"] for s in regression[0]] == sorted(s["delta"] for s in regression[0])


# ---- the guarantee on synthetic outputs -----------------------------------------------------------------
def synthetic_outputs(n, rng):
    """Two classes, 4 layers. The full model's (ramp 4) prediction is the label; ramp 1 agrees with
    it on a known fraction of rows, its confidence (hence entropy) is drawn independently of
    agreement for some rows and higher for agreeing ones: the risk of an entropy threshold is an
    exact function of S that `true_risk` computes from a huge sample."""
    full = rng.integers(0, 2, n)
    agree = rng.random(n) < 0.9
    margin = np.where(agree, rng.gamma(2.0, 1.5, n), rng.gamma(1.2, 1.0, n))
    pred1 = np.where(agree, full, 1 - full)
    logits = np.zeros((4, n, 2), np.float32)
    for m, scale in ((0, 1.0), (1, 0.0), (2, 0.0)):  # ramps 2-3: uniform (never exit below ln 2)
        logits[m, np.arange(n), pred1] = scale * margin
    logits[3, np.arange(n), full] = 5.0
    return logits, full


def test_certified_settings_keep_their_promise_where_todays_rule_breaks_it():
    """>= 1000 draws of a calibration set; the true risk of each choice from 400,000 fresh rows.
    Learn then Test: P(true risk > eps) <= delta (plus simulation slack); today's rule (largest
    saving with calibration risk <= eps) exceeds eps about half the time."""
    rng = np.random.default_rng(1)
    eps, delta, n, draws = 0.05, 0.1, 400, 1000
    big, _ = synthetic_outputs(400_000, rng)
    order = risk.sequences("entropy", 4, 2)
    settings = [policies.make_policy("entropy", 4, 2, **s) for s in order[0]]
    truth = risk.risk_table(settings, big, "consistency")[0].mean(axis=1)  # [G]
    pool, _ = synthetic_outputs(n * draws, rng)
    table, exit_layer = risk.risk_table(settings, pool, "consistency")
    certified_over = naive_over = 0
    for d in range(draws):
        rows = slice(d * n, (d + 1) * n)
        counts, savings = table[:, rows].sum(axis=1), 1 - exit_layer[:, rows].mean(axis=1) / 4
        best, _ = risk.choose(counts, savings, [range(len(settings))], n, eps, delta)
        naive = risk.naive_choice(counts, savings, n, eps)
        certified_over += best is not None and truth[best] > eps
        naive_over += truth[naive] > eps
    slack = 3 * math.sqrt(delta * (1 - delta) / draws)
    assert certified_over / draws <= delta + slack, certified_over
    assert naive_over / draws > 0.3, naive_over
    assert 0 < truth.max() and truth[0] == 0.0


def test_certify_records_the_target_and_a_bound_within_it():
    rng = np.random.default_rng(2)
    logits, labels = synthetic_outputs(3000, rng)
    cert = risk.certify("entropy", logits, max_risk=0.05, delta=0.1)
    assert cert.certified and cert.n == 3000 and cert.sequences == 1
    assert cert.empirical_risk <= cert.bound <= 0.05 and cert.saving > 0
    d = cert.as_dict()
    assert {"policy", "params", "bound", "n", "max_risk", "risk_delta"} <= set(d) and list(d["params"]) == ["S"]
    # the bound is the chosen setting's own: its calibration events give it back
    events, _ = risk.risk_table([cert.policy], logits, "consistency")
    assert events.sum() / 3000 == pytest.approx(cert.empirical_risk)
    assert cert.bound == pytest.approx(risk.upper_bound(int(events.sum()), 3000, 0.1), abs=1e-9)
    drop = risk.certify("entropy", logits, risk="drop", labels=labels, max_risk=0.05)
    assert drop.certified and drop.risk == "drop"
    assert "certified entropy S=" in cert.describe()


def test_too_few_inputs_give_the_full_model_with_the_reason():
    logits, _ = synthetic_outputs(50, np.random.default_rng(3))
    cert = risk.certify("pcee", logits, max_risk=0.02, delta=0.1)
    assert not cert.certified and cert.bound == 0.0
    assert offline.evaluate(cert.policy, logits).saving == 0.0
    assert "too few" in cert.reason and "needs at least" in cert.reason
    assert cert.describe().startswith("no setting certified") and "full model" in cert.describe()
    ens = risk.certify("entropy+ensemble", logits, max_risk=0.02)
    assert ens.policy.label == "static" and ens.params == {"k": 4}  # the full model, predicting from ramp L
    regression = np.repeat(np.random.default_rng(6).normal(size=(4, 60, 1)).astype(np.float32), 1, axis=0)
    fallback = risk.certify("pabee", regression, max_risk=0.02, tolerance=0.01)
    assert not fallback.certified and offline.evaluate(fallback.policy, regression).saving == 0.0


def test_regression_risks_compare_within_the_tolerance():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 500, 1)).astype(np.float32) * np.array([0.5, 0.1, 0.0])[:, None, None]
    logits += 2.5
    with pytest.raises(ValueError, match="tolerance"):
        risk.certify("pabee", logits, max_risk=0.05)
    settings = [policies.make_policy("static", 3, 1, k=1)]
    events, _ = risk.risk_table(settings, logits, "consistency", tolerance=0.3)
    np.testing.assert_array_equal(events[0], np.abs(logits[0, :, 0] - logits[2, :, 0]) > 0.3)
    cert = risk.certify("pabee", logits, max_risk=0.05, tolerance=0.3)
    assert cert.certified and cert.sequences == 3  # one sequence per patience 1..L, delta split over them


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_risk=0.0), "max_risk must be a number in \\(0, 1\\)"),
    (dict(max_risk=1.0), "max_risk must be"),
    (dict(max_risk=0.1, delta=0.0), "risk_delta must be"),
    (dict(max_risk=0.1, delta=1.5), "risk_delta must be"),
    (dict(max_risk=0.1, risk="accuracy"), "unknown risk"),
    (dict(max_risk=0.1, risk="drop"), "needs labels"),
    (dict(max_risk=0.1, tolerance=0.1), "regression only"),
    (dict(max_risk=0.1, labels=np.zeros(7)), "labels must be \\[N\\]"),
    (dict(max_risk=0.1, method="bonferroni"), "unknown bound"),
])
def test_bad_values_are_refused_naming_what_is_wrong(kwargs, message):
    logits, _ = synthetic_outputs(200, np.random.default_rng(5))
    with pytest.raises(ValueError, match=message):
        risk.certify("entropy", logits, **kwargs)


def test_wrong_shaped_outputs_are_refused():
    with pytest.raises(ValueError, match=r"\[L, N, C\]"):
        risk.certify("entropy", np.zeros((4, 10)), max_risk=0.1)
