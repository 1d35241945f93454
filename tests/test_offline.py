"""Offline evaluation: closed-form grids equal stepping, efficiency names, sweeps, calibration."""

import math
import time

import numpy as np
import pytest

from jaxexit.exits import offline as O
from jaxexit.exits.types import RampOutputs
from jaxexit.exits import policies as P
from jaxexit.exits.policies import make_policy


def accuracy(predictions, labels):
    return float(np.mean(predictions == labels))


def pearson(predictions, labels):
    return float(np.corrcoef(predictions, labels)[0, 1])


def tied_logits(L, N, C, seed):
    """Small integer logits: many exact ties in entropy, max p, argmax and regression deltas."""
    return np.random.default_rng(seed).integers(-2, 3, size=(L, N, C)).astype(np.float32)


def grid_with_ties(label, logits):
    """Edge values, round values, and thresholds equal to measured values (strict comparisons)."""
    L, _, C = logits.shape
    picks = np.random.default_rng(7).choice(logits.shape[1], 4)
    name, confidence, _ = P.parse_label(label)
    if name == "pcee" and confidence == "maxprob":
        m = P.max_prob(logits)[:, picks[:2]].ravel().tolist()
        return [dict(patience=p, tau=tau) for p in (1, 2, L - 1, L, L + 2) for tau in [0.0, 1 / C, 0.7, 1.0] + m]
    if name == "entropy":
        h = P.entropy(logits)[:, picks].ravel().tolist()
        return [dict(S=s) for s in [0.0, 0.2, 0.5, math.log(C), 10.0] + h]
    if name == "maxprob":
        m = P.max_prob(logits)[:, picks].ravel().tolist()
        return [dict(t=t) for t in [0.0, 1 / C, 0.6, 0.9, 1.0] + m]
    if name == "pcee":
        c = P.normalized_entropy(logits)[:, picks[:2]].ravel().tolist()
        return [dict(patience=p, tau=tau) for p in (1, 2, 3, L - 1, L, L + 2) for tau in [0.0, 0.3, 0.7, 1.0] + c]
    if name == "margin":  # tied logits: many top-two ties, margin exactly 0
        m = P.top2_margin(logits)[:, picks].ravel().tolist()
        return [dict(margin=t) for t in [0.0, 0.3, 0.9, 1.0] + m]
    if name == "pabee" and C == 1:
        return [dict(patience=p, delta=d) for p in (1, 2, L - 1, L) for d in (0.0, 0.5, 1.0, 2.0, 4.0)]
    if name == "pabee":
        return [dict(patience=p) for p in range(1, L + 3)]
    return [dict(k=k) for k in range(1, L + 1)]


CASES = [(L, C, name) for L, C in [(6, 2), (12, 3), (2, 4), (6, 1)]
         for name in O.applicable(C) + (("pcee[maxprob]",) if C > 1 else ()) + ("pabee+ensemble", "static+ensemble")]
CASES += [(6, 3, "entropy+ensemble"), (6, 2, "pcee[maxprob]+ensemble")]


@pytest.mark.parametrize("L, C, name", CASES)
def test_closed_form_grid_equals_stepping_the_state_machine(L, C, name):
    for seed, logits in enumerate([tied_logits(L, 300, C, 0), tied_logits(L, 300, C, 1) * 3.1,
                                   np.random.default_rng(2).normal(size=(L, 300, C)).astype(np.float32)]):
        settings = [P.make_policy(name, L, C, **p) for p in grid_with_ties(name, logits)]
        grid = O.exit_layers(settings, logits)
        for policy, exit_layer in zip(settings, grid):
            want_layer, want_pred = P.simulate(policy, logits)
            np.testing.assert_array_equal(exit_layer, want_layer, err_msg=f"{policy}, logits {seed}")
            np.testing.assert_array_equal(O.evaluate(policy, logits).prediction, want_pred)


def test_closed_form_equals_stepping_across_blocks(monkeypatch):
    monkeypatch.setattr(O, "_BLOCK", 6 * 50 * 3)  # three settings per block
    logits = tied_logits(6, 50, 3, 3)
    settings = [make_policy("pcee", 6, 3, patience=p, tau=t) for p in (1, 2, 3) for t in (0.2, 0.5, 0.8)]
    settings += [make_policy("static", 6, 3, k=2), settings[0]]  # a mix, and a repeat
    want = np.stack([P.simulate(p, logits)[0] for p in settings])
    np.testing.assert_array_equal(O.exit_layers(settings, logits), want)


def test_single_layer_model_never_exits_early():
    logits = tied_logits(1, 20, 2, 0)
    for name, params in [("entropy", dict(S=9.0)), ("pabee", dict(patience=1)), ("static", dict(k=1))]:
        assert (O.exit_layers(make_policy(name, 1, 2, **params), logits) == 1).all()


def test_efficiency_and_histogram_use_design_names():
    assert O.efficiency(np.array([1, 2, 2, 6]), 6) == {
        "avg_layers": 2.75, "saving": 1 - 2.75 / 6, "speedup": 6 / 2.75}
    assert O.exit_histogram(np.array([1, 2, 2, 6]), 6).tolist() == [1, 2, 0, 0, 0, 1]


def test_evaluate_reports_exit_layers_predictions_from_that_ramp_and_score():
    z = np.array([[[0, 9], [0, 0], [0, 0]],      # layer 1: row 0 sure of class 1
                  [[0, 0], [9, 0], [0, 0]],      # layer 2: row 1 sure of class 0
                  [[9, 0], [0, 9], [0, 9]]], np.float32)
    ev = O.evaluate(make_policy("entropy", 3, 2, S=0.1), z, np.array([1, 0, 0]), accuracy)
    assert ev.exit_layer.tolist() == [1, 2, 3] and ev.prediction.tolist() == [1, 0, 1]
    assert ev.histogram.tolist() == [1, 1, 1] and ev.avg_layers == 2.0 and ev.saving == 1 - 2 / 3
    assert ev.speedup == 1.5 and ev.score == 2 / 3
    assert ev.row() == {"policy": "entropy", "params": {"S": 0.1}, "score": 2 / 3, "avg_layers": 2.0,
                        "saving": 1 - 2 / 3, "speedup": 1.5, "exit_histogram": [1, 1, 1]}


def test_sweep_rows_equal_evaluating_each_setting():
    logits = tied_logits(6, 100, 3, 4) * 2
    labels = np.random.default_rng(0).integers(0, 3, 100)
    grids = {"pcee": [dict(patience=2, tau=0.5), dict(patience=1, tau=0.9)], "static": None, "maxprob": [dict(t=0.9)]}
    rows = O.sweep(logits, labels, accuracy, grids)
    assert [r["policy"] for r in rows] == ["pcee"] * 2 + ["static"] * 6 + ["maxprob"]
    for row in rows:
        policy = P.Policy(row["policy"], 6, 3, tuple(row["params"].items()))
        assert row == O.evaluate(policy, logits, labels, accuracy).row()
    assert O.sweep(logits, grids={"static": [dict(k=3)]})[0]["score"] is None


def test_default_grids_span_each_policy_and_include_the_full_model():
    L, C = 6, 2
    entropy = O.default_grid("entropy", L, C)
    assert entropy[0] == {"S": 0.0} and entropy[-1] == {"S": math.log(2)}
    maxprob = O.default_grid("maxprob", L, C)
    assert maxprob[0] == {"t": 0.5} and maxprob[-1] == {"t": 1.0}
    pcee = O.default_grid("pcee", L, C)
    assert {g["patience"] for g in pcee} == set(range(1, L)) and {0.0, 1.0} <= {g["tau"] for g in pcee}
    assert O.default_grid("pabee", L, C) == [{"patience": p} for p in range(1, L + 1)]
    assert O.default_grid("static", L, C) == [{"k": k} for k in range(1, L + 1)]
    assert {g["patience"] for g in O.default_grid("pabee", L, 1)} == set(range(1, L + 1))
    with pytest.raises(ValueError, match="regression"):
        O.default_grid("entropy", L, 1)


def test_default_sweep_covers_applicable_policies_and_regression():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 80)
    logits = (labels + rng.normal(size=(6, 80)) / np.arange(1, 7)[:, None])[..., None].astype(np.float32)
    rows = O.sweep(logits, labels, pearson)
    assert {r["policy"] for r in rows} == {"pabee", "static"}
    full = [r for r in rows if r["policy"] == "static" and r["params"] == {"k": 6}][0]
    assert full["score"] == pytest.approx(pearson(logits[-1, :, 0], labels))
    assert {r["policy"] for r in O.sweep(tied_logits(6, 10, 2, 0))} == set(P.POLICIES) - {"berxit"}
    with_lte = RampOutputs(tied_logits(6, 10, 2, 0), tied_logits(6, 10, 1, 1)[..., 0])  # berxit needs an LTE
    assert {r["policy"] for r in O.sweep(with_lte)} == set(P.POLICIES)


def test_sweep_of_500_settings_on_sst2_sized_split_runs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 872)
    depth = np.arange(1, 7)[:, None, None]  # later ramps are more often right and more confident
    logits = (rng.normal(size=(6, 872, 2)) + depth * np.eye(2)[labels][None]).astype(np.float32)
    start = time.perf_counter()
    rows = O.sweep(logits, labels, accuracy)
    elapsed = time.perf_counter() - start
    assert len(rows) >= 500
    print(f"\nsweep: {len(rows)} settings, N=872, L=6 in {elapsed:.3f}s")


# ---- calibration --------------------------------------------------------------------------------
def staircase(correct_per_layer, N=10):
    """Logits [L, N, 2] whose ramp l gets the first `correct_per_layer[l]` of N (label 1) right."""
    logits = np.zeros((len(correct_per_layer), N, 2), np.float32)
    for layer, correct in enumerate(correct_per_layer):
        logits[layer, :correct, 1] = 1.0
        logits[layer, correct:, 0] = 1.0
    return logits, np.ones(N, np.int64)


STATIC = [dict(k=k) for k in range(1, 5)]  # savings 0.75, 0.5, 0.25, 0


@pytest.mark.parametrize("rule, k", [
    (dict(target_saving=0.25), 3),   # k = 1, 2, 3 qualify; k = 3 scores best
    (dict(target_saving=0.3), 2),    # k = 1, 2 qualify
    (dict(target_saving=0.0), 3),    # k = 3 and 4 tie on score; higher saving wins
    (dict(max_drop=0.1), 2),         # drop 0.9 - 0.8 is 0.09999999999999998: counts as 0.1
    (dict(max_drop=0.05), 3),        # k = 3, 4 have no drop; k = 3 saves more
    (dict(max_drop=0.5), 1),
    (dict(near_saving=0.3), 3),      # k = 3 (0.25) is within 0.05 of 0.3; k = 2 (0.5) is not
    (dict(near_saving=0.5), 2),      # only k = 2 is within the band
    (dict(near_saving=0.4), 2),      # none within 0.05: the nearest saving, 0.5 (k = 2)
])
def test_calibration_picks_the_documented_setting(rule, k):
    logits, labels = staircase([5, 8, 9, 9])
    held_logits, held_labels = staircase([2, 6, 7, 10])
    cal = O.calibrate("static", logits, labels, accuracy, grid=STATIC, heldout=(held_logits, held_labels), **rule)
    assert cal.policy == make_policy("static", 4, 2, k=k)
    assert cal.calibration["params"] == {"k": k} and cal.calibration["full_score"] == 0.9
    assert cal.heldout["params"] == {"k": k} and cal.heldout["full_score"] == 1.0
    assert cal.heldout["score"] == [0.2, 0.6, 0.7, 1.0][k - 1] and cal.heldout["saving"] == 1 - k / 4
    assert cal.heldout["drop"] == pytest.approx(1.0 - cal.heldout["score"])


def test_calibrated_entropy_threshold_is_best_among_qualifying_settings():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    logits = (rng.normal(size=(6, 400, 2)) * 2 + np.arange(1, 7)[:, None, None] * np.eye(2)[labels]).astype(np.float32)
    rows = O.sweep(logits, labels, accuracy, {"entropy": None})
    cal = O.calibrate("entropy", logits, labels, accuracy, target_saving=0.4)
    assert cal.calibration["saving"] >= 0.4
    assert cal.calibration["score"] == max(r["score"] for r in rows if r["saving"] >= 0.4)
    full = O.full_score(logits, labels, accuracy)
    cal = O.calibrate("entropy", logits, labels, accuracy, max_drop=0.01)
    assert full - cal.calibration["score"] <= 0.01 + 1e-9 and cal.heldout is None
    assert cal.calibration["saving"] == max(r["saving"] for r in rows if full - r["score"] <= 0.01 + 1e-9)


def test_calibration_errors():
    logits, labels = staircase([5, 8, 9, 9])
    with pytest.raises(ValueError, match="exactly one"):
        O.calibrate("static", logits, labels, accuracy)
    with pytest.raises(ValueError, match="exactly one"):
        O.calibrate("static", logits, labels, accuracy, target_saving=0.1, max_drop=0.1)
    with pytest.raises(ValueError, match="largest saving in the grid is 0.75"):
        O.calibrate("static", logits, labels, accuracy, target_saving=0.8, grid=STATIC)
    with pytest.raises(ValueError, match="smallest drop"):
        O.calibrate("static", logits, labels, accuracy, max_drop=0.0, grid=[dict(k=1)])
    with pytest.raises(ValueError, match="target_saving must be"):
        O.calibrate("static", logits, labels, accuracy, target_saving=1.0)
    with pytest.raises(ValueError, match="near_saving must be"):
        O.calibrate("static", logits, labels, accuracy, near_saving=-0.1)
    with pytest.raises(ValueError, match="exactly one"):
        O.calibrate("static", logits, labels, accuracy, near_saving=0.3, max_drop=0.1)
    with pytest.raises(ValueError, match="max_drop must be"):
        O.calibrate("static", logits, labels, accuracy, max_drop=-0.1)


def test_settings_must_match_the_logits():
    with pytest.raises(ValueError, match="is for L=6"):
        O.exit_layers(make_policy("static", 6, 2, k=2), tied_logits(4, 5, 2, 0))
    with pytest.raises(ValueError, match="needs labels"):
        O.evaluate(make_policy("static", 4, 2, k=2), tied_logits(4, 5, 2, 0), metric=accuracy)
