"""jaxexit-infer (infer/run.py) on a real fine-tuned MiniLM checkpoint: summary, JSON, sweep, calibration, errors."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import pytest

from conftest import GLUE
from jaxexit.cli import infer, policy_flags
from jaxexit.exits import offline, policies, runners
from jaxexit.text import glue, metrics
from jaxexit.text.inputs import load_inputs
from jaxexit.text.model import EarlyExitModel


@pytest.fixture(scope="module")
def minilm_model(trained_minilm_run):
    return EarlyExitModel.from_run(trained_minilm_run.path)


@pytest.fixture
def shared_model(monkeypatch, trained_minilm_run, minilm_model):
    """The command loads the run's model once for this module (a new instance compiles its steps
    again); the first test goes through the real load."""
    def from_run(path):
        same = Path(path).resolve() == trained_minilm_run.path.resolve()
        return minilm_model if same else EarlyExitModel.from_run(path)

    monkeypatch.setattr(infer, "EarlyExitModel", types.SimpleNamespace(from_run=from_run))
    return minilm_model


def test_pcee_by_default_with_timing_and_json(trained_minilm_run, tmp_path, capsys):
    out = tmp_path / "r.json"
    result = infer.run(["--checkpoint", str(trained_minilm_run.path), "--patience", "2", "--tau", "0.9",
                        "--limit", "24", "--json", str(out), "--output", str(tmp_path / "pred.tsv")])
    printed = capsys.readouterr().out
    assert "pcee" in printed and "wall saving" in printed and "exits/layer" in printed
    saved = json.loads(out.read_text())
    assert saved["policy"] == "pcee" and saved["patience"] == 2 and saved["tau"] == 0.9
    for key in ("score", "metrics", "avg_layers", "saving", "speedup", "time_early_exit_s", "time_full_model_s",
                "wall_saving", "exit_histogram", "per_layer", "checkpoint", "split"):
        assert key in saved, key
    assert sum(saved["exit_histogram"]) == 24 and len(saved["per_layer"]) == 6
    assert saved["saving"] == pytest.approx(1 - saved["avg_layers"] / 6)
    assert result["n"] == 24
    with open(tmp_path / "pred.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["index", "prediction"] and len(rows) == 25
    with open(tmp_path / "pred.exits.tsv") as f:
        exits = list(csv.reader(f, delimiter="\t"))
    assert exits[0] == ["index", "prediction", "exit_layer"] and all(1 <= int(r[2]) <= 6 for r in exits[1:])


@pytest.mark.parametrize("mode", ["latency", "batched", "device", "offline"])
def test_confidence_and_ensemble_flags_run_in_every_mode_as_offline(trained_minilm_run, shared_model, tmp_path, mode):
    argv = ["--checkpoint", str(trained_minilm_run.path), "--patience", "2", "--tau", "0.5", "--confidence", "maxprob",
            "--ensemble", "--limit", "24", "--mode", mode, "--json", str(tmp_path / f"{mode}.json")]
    # batches of 4: the batched mode's warm-up compiles every row count a batch can shrink to, and
    # every take of rows between two of them (row buckets 1..4 here, 1..8 at 8: 3x the compilations)
    result = infer.run(argv + (["--batch-size", "4"] if mode in ("batched", "device") else []))
    assert result["policy"] == "pcee[maxprob]+ensemble" and result["patience"] == 2
    model = shared_model
    split, _ = load_inputs(trained_minilm_run, model, glue.get_task("sst2"), "validation", str(GLUE / "SST-2"),
                           limit=24)
    policy = policies.make_policy("pcee[maxprob]+ensemble", 6, 2, patience=2, tau=0.5)
    want = offline.evaluate(policy, runners.cached_logits(model, split), split.labels, metrics.accuracy)
    assert want.saving > 0  # rows exit before layer 6, where the ensemble has more than one ramp to average
    assert result["exit_histogram"] == want.histogram.tolist() and result["score"] == pytest.approx(want.score)


def test_sweep_writes_csv_and_png(trained_minilm_run, shared_model, tmp_path):
    result = infer.run(["--checkpoint", str(trained_minilm_run.path), "--sweep", "--limit", "64",
                        "--json", str(tmp_path / "s.json")])
    assert result["settings"] >= 500
    with open(result["sweep_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {r["policy"] for r in rows} == set(policies.POLICIES) - {"berxit"}  # no LTE in this checkpoint
    png = open(result["sweep_png"], "rb").read(8)
    assert png.startswith(b"\x89PNG")


def test_calibration_reports_on_the_other_half(trained_minilm_run, shared_model, tmp_path):
    result = infer.run(["--checkpoint", str(trained_minilm_run.path), "--policy", "maxprob",
                        "--target-saving", "0.3", "--limit", "80", "--json", str(tmp_path / "c.json")])
    cal = result["calibration"]
    assert cal["calibration_half"]["saving"] >= 0.3 - 1e-9
    assert cal["split_seed"] == 0 and "split seed 0" in cal["halves"] and "report_half" in cal
    assert cal["fixed"] == {} and set(cal["chosen"]) == {"t"}
    assert json.loads((tmp_path / "c.json").read_text())["calibration"]["split_seed"] == 0
    again = infer.run(["--checkpoint", str(trained_minilm_run.path), "--policy", "maxprob", "--split-seed", "5",
                       "--target-saving", "0.3", "--limit", "80", "--json", str(tmp_path / "c5.json")])
    assert again["calibration"]["split_seed"] == 5


@pytest.mark.parametrize("flags, fixed, chosen", [
    (["--policy", "pcee", "--patience", "2"], {"patience": 2}, {"tau"}),  # the docstring's example
    (["--tau", "1.0"], {"tau": 1.0}, {"patience"}),                    # implies pcee; patience left open
    (["--policy", "pcee"], {}, {"patience", "tau"}),
])
def test_calibration_keeps_given_parameters_fixed(trained_minilm_run, shared_model, tmp_path, capsys, flags, fixed,
                                                   chosen):
    result = infer.run(["--checkpoint", str(trained_minilm_run.path), *flags, "--target-saving", "0.3",
                        "--limit", "64", "--json", str(tmp_path / "c.json")])
    cal = result["calibration"]
    assert cal["fixed"] == fixed and set(cal["chosen"]) == chosen
    assert {k: cal["policy"][k] for k in fixed} == fixed
    printed = capsys.readouterr().out
    fixed_text = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "none"
    assert f"fixed {fixed_text}; chosen " in printed and all(f"{k}=" in printed.split("chosen")[1] for k in chosen)


def test_flags_that_cannot_apply_are_errors(trained_minilm_run, shared_model, capsys):
    ckpt = str(trained_minilm_run.path)
    for argv, message in [
        (["--policy", "pcee", "--S", "0.3", "--target-saving", "0.3"], "S cannot apply to it"),
        (["--policy", "entropy", "--S", "0.3", "--target-saving", "0.3"], "nothing is left to calibrate"),
        (["--policy", "pcee", "--patience", "0", "--target-saving", "0.3"], "patience must be in 1.."),
        (["--sweep", "--tau", "0.2"], "--tau cannot apply here: --sweep evaluates every policy"),
        (["--policy", "entropy", "--target-saving", "0.3", "--mode", "batched"], "--mode cannot apply here"),
        (["--policy", "entropy", "--target-saving", "0.3", "--max-drop", "0.01"], "one calibration target"),
        (["--tau", "0.2", "--batch-size", "8"], "--batch-size cannot apply here: latency mode"),
        (["--tau", "0.2", "--split-seed", "3"], "--split-seed cannot apply here"),
        (["--tau", "0.2", "--limit", "-1"], "--limit must be >= 0"),
        (["--sweep", "--ensemble"], "--ensemble cannot apply here: --sweep"),
        (["--policy", "entropy", "--S", "0.2", "--confidence", "maxprob"], "confidence applies to pcee only"),
    ]:
        with pytest.raises(SystemExit):
            infer.run(["--checkpoint", ckpt, "--limit", "16", *argv])  # a later --limit wins
        assert message in capsys.readouterr().err, argv


def test_own_text(trained_minilm_run, shared_model, capsys):
    infer.run(["--checkpoint", str(trained_minilm_run.path), "--patience", "1", "--tau", "0.5",
               "--text", "a gripping , funny film", "dull and lifeless"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in ("positive", "negative") and "layer" in lines[0]


def test_clear_errors(trained_minilm_run, shared_model, tmp_path, capsys):
    ckpt = str(trained_minilm_run.path)
    for argv, message in [
        (["--checkpoint", str(tmp_path / "none"), "--tau", "0.2"], "does not exist"),
        (["--checkpoint", ckpt, "--tau", "1.5"], "tau must be in"),
        (["--checkpoint", ckpt, "--policy", "static", "--k", "9"], "k must be in 1..6"),
        (["--checkpoint", ckpt], "no exit policy"),
        (["--checkpoint", ckpt, "--tau", "0.2", "--data-dir", str(GLUE / "MRPC")], "trained on SST-2"),
        (["--checkpoint", ckpt, "--tau", "0.2", "--text", "   "], "no input text"),
        (["--checkpoint", ckpt, "--sweep", "--split", "test"], "no labels"),
        (["--runs-dir", str(tmp_path), "--tau", "0.2"], "run train/finetune.py first"),
    ]:
        with pytest.raises(SystemExit):
            infer.run(argv)
        assert message in capsys.readouterr().err, argv


def test_policy_defaults_and_regression_refusal():
    assert policy_flags.policy_from_args(None, {"patience": 2, "tau": 0.2}, 6, 2).name == "pcee"
    assert policy_flags.policy_from_args(None, {"tau": 0.2}, 6, 2)["patience"] == 1
    assert policy_flags.policy_from_args(None, {"patience": 2}, 6, 2).name == "pabee"
    assert policy_flags.policy_from_args(None, {"patience": 2, "delta": 0.1}, 6, 1).name == "pabee"
    with pytest.raises(ValueError, match="regression"):
        policy_flags.policy_from_args("entropy", {"S": 0.1}, 6, 1)
    with pytest.raises(ValueError, match="regression"):
        policy_flags.policy_from_args(None, {"patience": 2, "tau": 0.2}, 6, 1)
    with pytest.raises(ValueError, match="do not name one policy"):
        policy_flags.policy_from_args(None, {"S": 0.1, "t": 0.5}, 6, 2)
    with pytest.raises(ValueError, match="unexpected"):
        policy_flags.policy_from_args("pabee", {"patience": 2, "tau": 0.3}, 6, 2)
