"""The official GLUE metrics in plain numpy, and which of them each task reports.

CoLA: Matthews correlation. SST-2, MNLI (each dev split on its own), QNLI, RTE: accuracy.
MRPC, QQP: F1 of class 1 (paraphrase / duplicate) and accuracy. STS-B: Pearson and Spearman.
Values match sklearn / scipy (`accuracy_score`, `f1_score`, `matthews_corrcoef`, `pearsonr`,
`spearmanr`), except that a correlation left undefined by a constant input is 0, as sklearn
already defines MCC, rather than NaN: an early ramp that predicts one value scores 0, and a
threshold search over scores never meets a NaN.
"""

from __future__ import annotations

import numpy as np

from jaxexit.text.glue import Task, get_task


def accuracy(predictions, labels) -> float:
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions, labels, positive: int = 1) -> float:
    """Binary F1 of class `positive`; 0 when neither predictions nor labels contain it."""
    predictions, labels = _pair(predictions, labels)
    predicted, actual = predictions == positive, labels == positive
    true_pos = np.sum(predicted & actual)
    wrong = np.sum(predicted != actual)  # false positives + false negatives
    return float(2 * true_pos / (2 * true_pos + wrong)) if true_pos else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation (multi-class form, as sklearn); 0 when a marginal is constant."""
    predictions, labels = _pair(predictions, labels)
    classes, codes = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    k, n = len(classes), len(labels)
    confusion = np.zeros((k, k), np.float64)  # float: the products below overflow int64 on QQP-sized sets
    np.add.at(confusion, (codes[:n], codes[n:]), 1.0)
    true_sum, pred_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), float(n)
    cov_true_pred = correct * total - true_sum @ pred_sum
    cov_pred = total**2 - pred_sum @ pred_sum
    cov_true = total**2 - true_sum @ true_sum
    if cov_pred * cov_true == 0:
        return 0.0
    return float(cov_true_pred / np.sqrt(cov_true * cov_pred))


def pearson(predictions, labels) -> float:
    """Pearson correlation; 0 when either side is constant."""
    x, y = _pair(predictions, labels, dtype=np.float64, min_size=2)
    x, y = x - x.mean(), y - y.mean()
    scale = np.sqrt(np.sum(x * x) * np.sum(y * y))
    if scale == 0:
        return 0.0
    return float(np.clip(np.sum(x * y) / scale, -1.0, 1.0))


def spearman(predictions, labels) -> float:
    """Spearman correlation: Pearson on ranks, tied values sharing their average rank."""
    x, y = _pair(predictions, labels, dtype=np.float64, min_size=2)
    return pearson(rank_average(x), rank_average(y))


def rank_average(values) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (scipy's rankdata 'average')."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]  # each tie group spans ranks starts+1 .. ends
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def primary_metric(task: str | Task) -> str:
    """The metric a task is ranked by: mcc, accuracy, f1 (MRPC, QQP) or pearson (STS-B)."""
    return get_task(task).metric_names[0]


def primary_scorer(task: str | Task):
    """`score(predictions, labels) -> float` in the task's primary metric (for sweeps and calibration)."""
    task = get_task(task)
    name = primary_metric(task)
    return lambda predictions, labels: task_metrics(task, predictions, labels)[name]


def task_metrics(task: str | Task, predictions, labels) -> dict[str, float]:
    """Every metric GLUE reports for `task`, keyed by name (primary first).

    `predictions` are class ids (argmax of the logits) or, for STS-B, scores; `labels` as
    `glue.labels_array` gives them. Call once per MNLI dev split.
    """
    task = get_task(task)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1:
        hint = "" if task.is_regression else "; take argmax over the class axis first"
        raise ValueError(f"{task.tsv_dir} predictions must have shape [N], got {predictions.shape}{hint}")
    predictions, labels = _pair(predictions, labels, min_size=2 if task.is_regression else 1)
    if labels.dtype == object:
        raise ValueError(f"{task.tsv_dir} labels contain None: test splits have no labels to score against")
    if not task.is_regression:
        for what, values in (("predictions", predictions), ("labels", labels)):
            if not np.issubdtype(values.dtype, np.integer):
                raise ValueError(f"{task.tsv_dir} {what} must be integer class ids, got dtype {values.dtype}")
            if values.size and (values.min() < 0 or values.max() >= task.num_labels):
                raise ValueError(f"{task.tsv_dir} {what} must lie in 0..{task.num_labels - 1}, "
                                 f"got {values.min()}..{values.max()}")
    return {name: METRICS[name](predictions, labels) for name in task.metric_names}


def _pair(predictions, labels, dtype=None, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions, dtype), np.asarray(labels, dtype)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(f"predictions and labels must be 1-D of the same length, "
                         f"got shapes {predictions.shape} and {labels.shape}")
    if len(labels) < min_size:
        raise ValueError(f"need at least {min_size} example(s) to score, got {len(labels)}")
    return predictions, labels
