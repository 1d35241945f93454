"""Certified exit settings against today's rule (`jaxexit.analysis.risk`): the table agrees with
`exits.risk.certify`, the violation counts behave as the guarantee says on a synthetic run, the
committed `risk.json` files regenerate, and `infer/analyze.py --risk-from` writes the files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import GLUE, REPO, require
from jaxexit.analysis import risk as R
from jaxexit.cli import analyze as analyze_cli
from jaxexit.exits import offline
from jaxexit.exits import risk as lt

COMMITTED = sorted(p.parent for p in (REPO / "results").glob("**/analysis.json"))


def synthetic(n: int = 2000, num_layers: int = 4, seed: int = 0):
    """Binary logits whose early ramps disagree with the final one with probability 0.5 exp(-m)
    for a per-input margin m ~ U(0, 3): the consistency risk grows smoothly with the entropy
    threshold, so today's rule lands at risk ~eps (and breaks it about half the time)."""
    rng = np.random.default_rng(seed)
    full = rng.integers(0, 2, n)
    logits = np.empty((num_layers, n, 2))
    for layer in range(num_layers):
        margin = rng.uniform(0, 3, n) if layer < num_layers - 1 else np.full(n, 3.0)
        flip = rng.random(n) < (0.5 * np.exp(-margin) if layer < num_layers - 1 else 0.0)
        pred = np.where(flip, 1 - full, full)
        logits[layer, np.arange(n), pred] = margin / 2
        logits[layer, np.arange(n), 1 - pred] = -margin / 2
    labels = np.where(rng.random(n) < 0.9, full, 1 - full)
    return logits.astype(np.float32), labels


@pytest.fixture(scope="module")
def run():
    logits, labels = synthetic()
    return logits, labels, R.analyze(logits, labels, splits=100)


def test_today_rule_breaks_its_promise_the_certified_one_keeps_it(run):
    _, _, result = run
    rows = result["violations"]["rows"]
    assert {r["policy"] for r in rows} == {"entropy", "pcee"} and {r["max_risk"] for r in rows} == set(R.EPS)
    for r in rows:
        assert r["splits"] == 100 and r["certified"]["splits_certified"] == 100
        assert r["naive"]["rate"] >= 0.15, r                 # lands at risk ~eps: often over it
        assert r["certified"]["rate"] <= 0.2, r              # at most delta = 0.1, up to 100 splits' noise
        assert r["naive"]["rate"] > r["certified"]["rate"], r
        assert r["certified"]["population_rate"] <= 0.1, r    # the certificate's own claim, on all 2000
        assert r["certified"]["mean_report_saving"] < r["naive"]["mean_report_saving"]  # the guarantee's cost
        assert r["certified"]["mean_report_saving"] > 0.05  # certified, yet saving
    assert sum(r["naive"]["violations"] for r in rows) > 3 * sum(r["certified"]["violations"] for r in rows)
    assert sum(r["naive"]["population_violations"] for r in rows) > 3 * sum(
        r["certified"]["population_violations"] for r in rows)


def test_table_is_certify_on_the_calibration_half_and_measured_on_the_report_half(run):
    logits, labels, result = run
    cal, rep = offline.split_halves(logits.shape[1], 0)
    assert (result["calibration_n"], result["report_n"]) == (len(cal), len(rep))
    assert {(r["policy"], r["risk"]) for r in result["table"]} == {
        (p, risk) for p in offline.applicable(2) for risk in lt.RISKS}
    for r in result["table"]:
        if r["policy"] not in ("entropy", "pcee", "static"):
            continue
        cert = lt.certify(r["policy"], logits[:, cal], risk=r["risk"], max_risk=r["max_risk"], labels=labels[cal])
        c = r["certified"]
        assert cert.certified == c["certified"]
        if cert.certified:
            assert cert.params == c["params"] and cert.bound == pytest.approx(c["bound"])
            assert cert.saving == pytest.approx(c["calibration_saving"]) and c["bound"] <= r["max_risk"]
            policy = offline.Policy(r["policy"], 4, 2, tuple(c["params"].items()))
            layers = offline.exit_layers(policy, logits[:, rep])
            preds = offline.ramp_predictions(logits[:, rep])
            exit_pred = preds[layers - 1, np.arange(len(rep))]
            full = preds[-1]
            events = (exit_pred != full) if r["risk"] == "consistency" else (
                (full == labels[rep]) & (exit_pred != labels[rep]))
            assert c["report_risk"] == pytest.approx(events.mean())
            assert c["report_saving"] == pytest.approx(offline.efficiency(layers, 4)["saving"])
        n = r["naive"]
        assert n["calibration_risk"] <= r["max_risk"] + 1e-12
        assert n["calibration_saving"] >= c["calibration_saving"] - 1e-12  # today's rule: no test, more saving


def test_without_labels_only_consistency_and_bad_values_refused():
    logits, _ = synthetic(n=200)
    result = R.analyze(logits, None, splits=3)
    assert result["risks"] == ["consistency"] and {r["risk"] for r in result["table"]} == {"consistency"}
    assert result["violations"]["splits"] == 3
    with pytest.raises(ValueError, match="at least 1 random split"):
        R.analyze(logits, None, splits=0)
    # Regression: the tolerance of 0.2 label units applies, pabee stands for entropy.
    stsb = np.cumsum(np.random.default_rng(1).normal(0, 0.1, (4, 100, 1)), axis=0).astype(np.float32)
    reg = R.analyze(stsb, np.zeros(100, np.float32), splits=2)
    assert reg["tolerance"] == R.REGRESSION_TOLERANCE
    assert {r["policy"] for r in reg["violations"]["rows"]} == {"pabee"}
    # The fallback is the full model itself: risk 0, saving 0.
    fam = R.family("pabee", stsb, "consistency", None, R.REGRESSION_TOLERANCE)
    assert not fam.events[fam.fallback].any() and (fam.layers[fam.fallback] == 4).all()


def test_files_and_figure_are_written(run, tmp_path):
    _, _, result = run
    R.write(result, tmp_path, "synthetic", command="cmd")
    assert (tmp_path / "risk_violations.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "risk.json").read_text())["command"] == "cmd"
    text = (tmp_path / "risk.md").read_text()
    assert "### consistency risk, report half" in text and "### drop risk, report half" in text
    assert "Broken promises over 100 random halves" in text and "Made by: `cmd`" in text


def test_every_committed_analysis_has_its_risk_files():
    assert COMMITTED, "no committed analyses"
    for d in COMMITTED:
        for name in ("risk.json", "risk.md", "risk_violations.png"):
            assert (d / name).is_file(), f"{d.relative_to(REPO)}/{name}: run python infer/analyze.py --risk-from {d.relative_to(REPO)}"
        made = json.loads((d / "risk.json").read_text())
        assert made["command"] == f"python infer/analyze.py --risk-from {d.relative_to(REPO)}"


def test_committed_risk_files_regenerate_and_the_cli_remakes_them(tmp_path):
    committed = REPO / "results" / "analysis" / "mrpc-joint"
    about = json.loads((committed / "analysis.json").read_text())
    labels = R.committed_labels(about, str(require(GLUE)))
    fresh = R.analyze(R.committed_outputs(committed), labels, split_seed=about["split_seed"], splits=100)
    want = json.loads((committed / "risk.json").read_text())
    want.pop("command")
    assert json.loads(json.dumps(fresh)) == want
    # The CLI on a copy, from logits.npy and the GLUE dev labels only; errors exit 2.
    copy = tmp_path / "mrpc-joint"
    copy.mkdir()
    for name in ("analysis.json", "logits.npy"):
        shutil.copy(committed / name, copy / name)
    analyze_cli.run(["--risk-from", str(copy), "--data-dir", str(GLUE / "MRPC"), "--risk-splits", "5"])
    made = json.loads((copy / "risk.json").read_text())
    assert made["table"] == want["table"] and made["violations"]["splits"] == 5
    assert (copy / "risk_violations.png").is_file() and (copy / "risk.md").is_file()
    with pytest.raises(SystemExit) as stop:
        analyze_cli.run(["--risk-from", str(tmp_path)])
    assert stop.value.code == 2
    with pytest.raises(SystemExit):
        analyze_cli.run([str(copy)])  # --out is required without --risk-from
