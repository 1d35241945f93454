"""The calibration table: every ramp's outputs on the run's labelled split (computed once, stored in
`<run>/serving/`; an export carries its own, `calibration.npz`) and, per policy, its sweep rows there;
a target saving maps to the best setting with at least that saving (`offline.choose`, the rule of
`jaxexit-infer --target-saving`)."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from jaxexit.exits import offline, policies, runners
from jaxexit.exits.types import RampOutputs
from jaxexit.serving.errors import RequestError
from jaxexit.text import checkpoints, export, glue, metrics
from jaxexit.text.inputs import load_inputs
from jaxexit.text.model import EarlyExitModel
from jaxexit.training.checkpoint import RunDir

log = logging.getLogger(__name__)


class CalibrationTable:
    """Every ramp's outputs on a labelled split, and per policy its sweep rows there.

    `lookup(label, target, fixed)` is the setting of policy `label` (its parameters in `fixed`
    held) with the best score among those whose saving on the split is >= `target`.
    """

    def __init__(self, outputs, labels: np.ndarray, task: glue.Task, source: str):
        self.outputs, self.labels, self.task, self.source = outputs, np.asarray(labels), task, source
        logits, lte = offline.parts(outputs)
        self.num_layers, self.size, self.num_labels = logits.shape
        self.has_lte = lte is not None
        self.full_score = offline.full_score(outputs, self.labels, metrics.primary_scorer(task))
        self._rows: dict[str, list[dict]] = {}

    def rows(self, label: str) -> list[dict]:
        """Policy `label`'s default grid evaluated on the split (sweep rows plus `drop`), memoised."""
        if label not in self._rows:
            offline.default_grid(label, self.num_layers, self.num_labels)  # refuses what cannot apply
            rows = offline.sweep(self.outputs, self.labels, metrics.primary_scorer(self.task), {label: None})
            self._rows[label] = [offline.with_drop(r, self.full_score) for r in rows]
        return self._rows[label]

    def _matching(self, label: str, fixed: dict) -> list[dict]:
        rows = [r for r in self.rows(label) if all(r["params"].get(k) == v for k, v in fixed.items())]
        if not rows:  # a value the policy refuses: ValueError (422); a valid one off the grid: the table's state, 409
            policies.make_policy(label, self.num_layers, self.num_labels, **{**self.rows(label)[0]["params"], **fixed})
            given = ", ".join(f"{k}={v}" for k, v in fixed.items())
            raise RequestError(f"the calibration table has no {label} setting with {given}: fix only values in "
                               f"{label}'s grid (see GET /v1/policy), or none", status=409)
        return rows

    def max_saving(self, label: str, fixed: dict | None = None) -> float:
        return max(r["saving"] for r in self._matching(label, dict(fixed or {})))

    def lookup(self, label: str, target: float, fixed: dict | None = None) -> tuple[policies.Policy, dict]:
        """(policy, its row on the split): the best score with saving >= `target`."""
        fixed = dict(fixed or {})
        rows = self._matching(label, fixed)
        reach = max(r["saving"] for r in rows)
        if target > reach + 1e-9:
            raise RequestError(f"target_saving {target} is beyond what {label} reaches on {self.source} "
                               f"({reach:.3f}); ask for at most that", status=409)  # the table's state: a 409
        index, _ = offline.choose(rows, target_saving=target, name=label)
        row = rows[index]
        return policies.make_policy(label, self.num_layers, self.num_labels, **row["params"]), row

    def summary(self) -> dict:
        return {"split": self.source, "inputs": self.size, "metric": metrics.primary_metric(self.task),
                "full_score": self.full_score}


def _fingerprint(run: RunDir | checkpoints.ExportDir) -> str:
    """Changes whenever the run's final parameters (an export's weights) are rewritten."""
    h = hashlib.sha256()
    exported = isinstance(run, checkpoints.ExportDir)
    files = [run.path / export.WEIGHTS] if exported else sorted((run.path / "model").rglob("*"))
    for path in files:
        if path.is_file():
            stat = path.stat()
            h.update(f"{path.relative_to(run.path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def export_table(source: checkpoints.ExportDir, task: glue.Task, split_name: str) -> CalibrationTable:
    """The table an export carries (`calibration.npz`: no data read). ValueError when it has none, or
    one of another split (then `load_table` with a data directory computes one)."""
    table = source.table_on(split_name)
    log.info("calibration table: ramp outputs of %s read from %s", split_name, source.path / export.TABLE)
    return CalibrationTable(table.outputs, table.labels, task, f"{split_name} ({len(table.labels)} inputs)")


def load_table(run: RunDir | checkpoints.ExportDir, model: EarlyExitModel, task: glue.Task, split_name: str,
               data_dir: str | None, batch_size: int = 64) -> CalibrationTable:
    """The calibration table of `run` on its labelled split `split_name`: the ramp outputs are read
    from `<run>/serving/` (an export's: `OUT.jaxexit/serving/`) when they were computed from the current
    parameters, else computed once (one offline pass) and stored there."""
    cache = checkpoints.work_dir(run) / "serving" / f"outputs-{split_name}.npz"
    fingerprint = _fingerprint(run)
    if cache.is_file():
        with np.load(cache) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("fingerprint") == fingerprint and meta.get("data_dir") == data_dir:
                outputs = data["logits"] if "lte" not in data else RampOutputs(data["logits"], data["lte"])
                log.info("calibration table: ramp outputs of %s read from %s", split_name, cache)
                return CalibrationTable(outputs, data["labels"], task, f"{split_name} ({len(data['labels'])} inputs)")
    split, _ = load_inputs(run, model, task, split_name, data_dir)
    if not split.labelled:
        raise ValueError(f"{task.tsv_dir} {split_name} has no labels: a calibration table needs a labelled split")
    log.info("calibration table: one pass over %s %s (%d inputs) ...", task.tsv_dir, split_name, len(split))
    outputs = runners.cached_logits(model, split, batch_size)
    logits, lte = offline.parts(outputs)
    arrays = {"logits": logits, "labels": split.labels,
              "meta": np.array(json.dumps({"fingerprint": fingerprint, "data_dir": data_dir}))}
    if lte is not None:
        arrays["lte"] = lte
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(cache)  # atomic: a half-written cache is never read
    log.info("calibration table: stored in %s", cache)
    return CalibrationTable(outputs, split.labels, task, f"{split_name} ({len(split)} inputs)")
