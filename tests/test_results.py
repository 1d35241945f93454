"""The committed trade-off curves regenerate: every row of each `results/analysis/*/tradeoff.csv`
comes out of `offline.sweep` on that directory's committed logits (`logits.npy`, with `lte.npy`
where the run has a learning-to-exit module) and the GLUE dev labels, exactly as written by
`jaxexit-analyze`. Policies added since a file was made add rows; none may change one."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import GLUE, REPO, require
from jaxexit.exits import offline
from jaxexit.exits.types import RampOutputs
from jaxexit.text import glue, metrics

ANALYSES = sorted(p.parent for p in (REPO / "results" / "analysis").glob("*/tradeoff.csv"))


def committed_rows(path) -> dict[tuple[str, str], list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {(r["policy"], r["params"]): [r["score"], r["avg_layers"], r["saving"], r["speedup"], r["exit_histogram"]]
            for r in rows}


@pytest.mark.parametrize("analysis", ANALYSES, ids=lambda p: p.name)
def test_the_committed_tradeoff_regenerates_from_the_committed_logits(analysis):
    about = json.loads((analysis / "analysis.json").read_text())
    task = glue.get_task(about["task"])
    split = about["split"]
    if split not in ("validation", "dev"):
        pytest.skip(f"{analysis.name}: split {split}")
    examples = glue.load_examples(task, split, require(GLUE / task.tsv_dir))
    labels = glue.labels_array(task, examples)
    logits = np.load(analysis / "logits.npy")
    assert logits.shape[1] == len(labels), f"{analysis.name}: logits for {logits.shape[1]} inputs, dev has {len(labels)}"
    outputs = RampOutputs(logits, np.load(analysis / "lte.npy")) if (analysis / "lte.npy").is_file() else logits
    fresh = {(r["policy"], json.dumps(r["params"], sort_keys=True)):
             [f"{r['score']:.5f}", f"{r['avg_layers']:.4f}", f"{r['saving']:.4f}", f"{r['speedup']:.4f}",
              " ".join(map(str, r["exit_histogram"]))]
             for r in offline.sweep(outputs, labels, metrics.primary_scorer(task))}
    want = committed_rows(analysis / "tradeoff.csv")
    missing = sorted(set(want) - set(fresh))
    assert not missing, f"{analysis.name}: {len(missing)} committed settings no longer swept, e.g. {missing[:3]}"
    changed = [k for k in want if fresh[k] != want[k]]
    assert not changed, f"{analysis.name}: {len(changed)} rows differ, e.g. {changed[0]}: {want[changed[0]]} -> {fresh[changed[0]]}"
