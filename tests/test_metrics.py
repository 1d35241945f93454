"""GLUE metrics: hand-computed values, cross-checks against scipy and scikit-learn, the per-task table."""

import math
from pathlib import Path

import numpy as np
import pytest

from jaxexit.text import glue
from jaxexit.text.metrics import (accuracy, f1, matthews_corrcoef, pearson, primary_metric, rank_average,
                             spearman, task_metrics)

PRED = [1, 1, 0, 1, 0]
GOLD = [1, 0, 0, 1, 1]  # tp=2, tn=1, fp=1, fn=1


def test_hand_computed_classification_metrics():
    assert accuracy(PRED, GOLD) == pytest.approx(3 / 5)
    assert f1(PRED, GOLD) == pytest.approx(2 / 3)  # 2*2 / (2*2 + 1 + 1)
    assert f1(PRED, GOLD, positive=0) == pytest.approx(0.5)  # tp=1, fp=1, fn=1
    assert matthews_corrcoef(PRED, GOLD) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))


def test_degenerate_classification_metrics():
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positives anywhere: sklearn's zero_division default
    assert f1([1, 1, 0], [0, 0, 0]) == 0.0
    assert matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant prediction: undefined -> 0
    assert matthews_corrcoef([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0


def test_mcc_equals_binary_formula_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, y = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        tp, tn = np.sum((p == 1) & (y == 1)), np.sum((p == 0) & (y == 0))
        fp, fn = np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1))
        expect = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        assert matthews_corrcoef(p, y) == pytest.approx(expect)


def test_mcc_does_not_overflow_on_large_sets():
    y = np.tile([0, 1, 1, 0], 250_000)
    p = y.copy()
    p[::7] = 1 - p[::7]
    value = matthews_corrcoef(p, y)
    assert 0.7 < value < 0.72  # ~1/7 flipped: 1 - 2/7


def test_hand_computed_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))  # ranks 1, 2.5, 2.5, 4
    assert spearman([1, 10, 100, 1000], [0.1, 0.2, 0.3, 5.0]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0  # constant side: undefined -> 0
    assert spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == 0.0


def test_rank_average():
    np.testing.assert_array_equal(rank_average([10, 20, 20, 30, 20]), [1, 3, 3, 5, 3])
    np.testing.assert_array_equal(rank_average([3.0, 1.0, 2.0]), [3, 1, 2])
    np.testing.assert_array_equal(rank_average([7, 7]), [1.5, 1.5])


def test_against_scipy_with_ties():
    import scipy.stats as stats  # a test requirement: this cross-check must run
    rng = np.random.default_rng(1)
    for _ in range(10):
        x = np.round(rng.uniform(0, 5, 200), 1)  # rounded so that ties are common, as in STS-B
        y = np.clip(x + rng.normal(0, 1, 200), 0, 5).round(1)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        np.testing.assert_allclose(rank_average(x), stats.rankdata(x, method="average"))


def test_against_sklearn():
    import sklearn.metrics as skm  # a test requirement (requirements-test.txt): this cross-check must run
    rng = np.random.default_rng(2)
    for k in (2, 3):
        p, y = rng.integers(0, k, 300), rng.integers(0, k, 300)
        assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
        assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    p, y = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    assert f1(p, y) == pytest.approx(skm.f1_score(y, p))


def test_task_metrics_per_task():
    both = task_metrics("MRPC", PRED, GOLD)
    assert list(both) == ["f1", "accuracy"] and both["f1"] == pytest.approx(2 / 3)
    assert list(task_metrics("qqp", PRED, GOLD)) == ["f1", "accuracy"]
    assert task_metrics("CoLA", PRED, GOLD) == {"mcc": pytest.approx(1 / 6)}
    for name in ("sst2", "qnli", "rte"):
        assert task_metrics(name, PRED, GOLD) == {"accuracy": pytest.approx(0.6)}
    assert task_metrics("mnli", [0, 1, 2, 2], [0, 1, 2, 1]) == {"accuracy": 0.75}
    sts = task_metrics("sts-b", np.array([1.0, 2.0, 3.0, 4.0], np.float32), [1.0, 3.0, 2.0, 4.0])
    assert sts == {"pearson": pytest.approx(0.8), "spearman": pytest.approx(0.8)}


def test_primary_metric():
    assert {t: primary_metric(t) for t in glue.TASKS} == {
        "cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "stsb": "pearson", "qqp": "f1",
        "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}


def test_task_metrics_on_loaded_labels():
    examples = glue.load_examples("mnli", "dev_matched", Path(__file__).resolve().parent / "fixtures" / "glue")
    labels = glue.labels_array("mnli", examples)
    assert task_metrics("mnli", labels, labels) == {"accuracy": 1.0}


@pytest.mark.parametrize("task, predictions, labels, message", [
    ("sst2", np.zeros((3, 2)), [0, 1, 0], r"shape \[N\], got \(3, 2\); take argmax"),
    ("sst2", [0, 1], [0, 1, 1], "same length"),
    ("sst2", [0.0, 1.0], [0, 1], "integer class ids"),
    ("mnli", [0, 3], [0, 1], r"0\.\.2, got 0\.\.3"),
    ("rte", [0, 1], [0, None], "contain None"),
    ("cola", [], [], "at least 1"),
    ("stsb", [1.0], [1.0], "at least 2"),
])
def test_task_metrics_refuses_bad_input(task, predictions, labels, message):
    with pytest.raises(ValueError, match=message):
        task_metrics(task, predictions, labels)
