"""Certified exit settings from the command line: `infer/calibrate.py` on cached ramp outputs (npz,
npy), and `infer/run.py --max-risk` on a fine-tuned run (halves of dev, or unlabelled texts)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import GLUE, REPO, require
from jaxexit.cli import calibrate, infer
from jaxexit.exits import offline, policies, risk, runners
from jaxexit.text import glue
from jaxexit.text.inputs import load_inputs
from jaxexit.text.model import EarlyExitModel

SST2_E3 = REPO / "results" / "analysis" / "sst2-joint-per_ramp-e3" / "logits.npy"


def ramp_logits(n: int, num_labels: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Six ramps whose margin for the true class grows with depth: `(logits [6, n, C], labels [n])`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, n)
    logits = rng.normal(0.0, 1.0, (6, n, num_labels)).astype(np.float32)
    for layer in range(6):
        logits[layer, np.arange(n), labels] += 0.8 * (layer + 1)
    return logits, labels


def certify_cli(argv, capsys) -> tuple[dict, list[str]]:
    """`calibrate.run(argv)` in-process: its result and its stdout lines."""
    result = calibrate.run(argv)
    return result, capsys.readouterr().out.strip().splitlines()


@pytest.fixture(scope="module")
def outputs_npz(tmp_path_factory) -> Path:
    logits, labels = ramp_logits(2000)
    path = tmp_path_factory.mktemp("outputs") / "dev.npz"
    np.savez(path, logits=logits, labels=labels)
    return path


def test_certifies_entropy_and_prints_the_certificate_then_its_json(outputs_npz, capsys):
    result, lines = certify_cli(["--outputs", str(outputs_npz), "--policy", "entropy", "--max-risk", "0.05"], capsys)
    assert json.loads(lines[-1]) == result and len(lines) == 2
    assert lines[0].startswith("certified entropy S=") and "consistency risk <= 0.05" in lines[0]
    assert result["certified"] and set(result["params"]) == {"S"} and result["policy"] == "entropy"
    assert result["n"] == 2000 and result["max_risk"] == 0.05 and result["risk_delta"] == 0.1
    assert result["bound"] <= 0.05 and result["saving"] > 0.2
    logits = np.load(outputs_npz)["logits"]
    want = risk.certify("entropy", logits, max_risk=0.05)
    assert result["params"] == want.params and result["bound"] == pytest.approx(want.bound)


@pytest.mark.parametrize("flags, label, params, method, delta", [
    (["--policy", "pcee", "--patience", "2"], "pcee", {"patience": 2}, "binomial", 0.1),  # tau certified
    (["--tau", "0.5"], "pcee", {"tau": 0.5}, "binomial", 0.1),           # implied pcee, patience certified
    (["--policy", "pcee", "--confidence", "maxprob", "--ensemble"], "pcee[maxprob]+ensemble", {}, "binomial", 0.1),
    (["--policy", "maxprob", "--risk-bound", "hb", "--risk-delta", "0.05"], "maxprob", {}, "hb", 0.05),
])
def test_given_parameters_are_held_and_the_rest_certified(outputs_npz, capsys, flags, label, params, method, delta):
    result, _ = certify_cli(["--outputs", str(outputs_npz), "--max-risk", "0.05", *flags], capsys)
    assert result["certified"] and result["policy"] == label
    assert {k: result["params"][k] for k in params} == params
    logits = np.load(outputs_npz)["logits"]
    want = risk.certify(label, logits, max_risk=0.05, delta=delta, method=method, fixed=params)
    assert result["params"] == want.params and result["sequences"] == want.sequences
    assert result["method"] == method and result["risk_delta"] == delta


def test_drop_risk_reads_the_labels_in_the_file(outputs_npz, capsys):
    result, lines = certify_cli(["--outputs", str(outputs_npz), "--policy", "entropy", "--risk", "drop",
                                 "--max-risk", "0.02"], capsys)
    data = np.load(outputs_npz)
    want = risk.certify("entropy", data["logits"], risk="drop", labels=data["labels"], max_risk=0.02)
    assert result["risk"] == "drop" and "drop risk <= 0.02" in lines[0] and result["params"] == want.params


def test_learned_policies_read_the_lte_array(tmp_path, capsys):
    logits, labels = ramp_logits(600)
    wrong = logits.argmax(-1) != labels
    lte = np.where(wrong, 2.0, -2.0).astype(np.float32)  # an LTE that knows when a ramp errs
    path = tmp_path / "lte.npz"
    np.savez(path, logits=logits, lte=lte)
    result, _ = certify_cli(["--outputs", str(path), "--policy", "berxit", "--max-risk", "0.05"], capsys)
    assert result["certified"] and result["policy"] == "berxit" and result["saving"] > 0.2


def test_regression_needs_and_records_a_tolerance(tmp_path, capsys):
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 5, 800)
    logits = np.stack([target + rng.normal(0, 1.5 / (m + 1), 800) for m in range(6)])[..., None].astype(np.float32)
    path = tmp_path / "stsb.npz"
    np.savez(path, logits=logits, labels=target)
    result, _ = certify_cli(["--outputs", str(path), "--policy", "pabee", "--max-risk", "0.1",
                             "--risk-tolerance", "0.5"], capsys)
    assert result["tolerance"] == 0.5 and set(result["params"]) == {"patience", "delta"}
    with pytest.raises(SystemExit) as stop:
        calibrate.run(["--outputs", str(path), "--policy", "pabee", "--max-risk", "0.1"])
    assert stop.value.code == 2 and "needs a tolerance" in capsys.readouterr().err


def test_too_few_inputs_give_the_full_model_and_exit_zero(tmp_path, capsys):
    logits, _ = ramp_logits(40)
    path = tmp_path / "few.npy"
    np.save(path, logits)
    result, lines = certify_cli(["--outputs", str(path), "--policy", "entropy", "--max-risk", "0.02"], capsys)
    assert not result["certified"] and result["saving"] == 0.0
    assert (result["policy"], result["params"]) == ("static", {"k": 6})  # every input to the last layer
    assert lines[0].startswith("no setting certified") and "too few" in lines[0] and "full model" in lines[0]
    assert json.loads(lines[-1]) == result and "too few" in result["reason"]


def test_committed_sst2_logits_half_certifies_a_large_saving(tmp_path, capsys):
    logits = np.load(require(SST2_E3))
    cal_rows, report_rows = offline.split_halves(logits.shape[1], 0)
    path = tmp_path / "half.npy"
    np.save(path, logits[:, cal_rows])
    result, _ = certify_cli(["--outputs", str(path), "--policy", "entropy", "--max-risk", "0.02"], capsys)
    assert result["certified"] and result["n"] == len(cal_rows) and result["saving"] > 0.4
    chosen = policies.make_policy("entropy", 6, 2, **result["params"])
    full = offline.ramp_predictions(logits[:, report_rows])[-1]
    exits = offline.evaluate(chosen, logits[:, report_rows])
    assert np.mean(exits.prediction != full) < 0.05 and exits.saving > 0.4  # holds on the other half too


def test_the_script_end_to_end(outputs_npz):
    done = subprocess.run([sys.executable, str(REPO / "infer" / "calibrate.py"), "--outputs", str(outputs_npz),
                           "--policy", "entropy", "--max-risk", "0.05"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    cert = json.loads(lines[-1])
    assert cert["certified"] and set(cert) >= {"policy", "params", "bound", "n", "max_risk", "risk_delta"}
    assert lines[0].startswith("certified entropy")


def _bad_files(tmp: Path) -> dict[str, Path]:
    logits, labels = ramp_logits(300)
    files = {"garbage.npz": b"not a zip", "text.txt": b"1 2 3"}
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    np.save(tmp / "flat.npy", logits[0])
    np.savez(tmp / "nologits.npz", scores=logits)
    np.savez(tmp / "badlabels.npz", logits=logits, labels=labels[:10])
    np.savez(tmp / "badlte.npz", logits=logits, lte=np.zeros((6, 10)))
    np.savez(tmp / "unlabelled.npz", logits=logits)
    with open(tmp / "onearray.npz", "wb") as f:
        np.save(f, logits)
    return {p.name: p for p in tmp.iterdir()}


@pytest.mark.parametrize("file, flags, message", [
    ("missing.npz", [], "does not exist"),
    ("text.txt", [], "expected an .npz"),
    ("garbage.npz", [], "is not a readable .npz file"),
    ("onearray.npz", [], "is not a readable .npz file"),
    ("nologits.npz", [], "no 'logits' array"),
    ("flat.npy", [], "logits must be [L, N, C], got shape (300, 2)"),
    ("badlabels.npz", [], "labels must be [N] = [300]"),
    ("badlte.npz", [], "lte must be [L, N] = [6, 300]"),
    ("unlabelled.npz", ["--risk", "drop"], "the drop risk needs labels"),
    ("unlabelled.npz", ["--max-risk", "0"], "--max-risk must be in (0, 1), got 0.0"),
    ("unlabelled.npz", ["--max-risk", "1.5"], "--max-risk must be in (0, 1)"),
    ("unlabelled.npz", ["--risk-delta", "1"], "--risk-delta must be in (0, 1), got 1.0"),
    ("unlabelled.npz", ["--risk-tolerance", "0.1"], "applies to regression only"),
    ("unlabelled.npz", ["--risk", "loss"], "invalid choice"),
    ("unlabelled.npz", ["--policy", "entropy", "--S", "0.2"], "nothing is left to calibrate"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, file, flags, message):
    path = _bad_files(tmp_path).get(file, tmp_path / file)
    with pytest.raises(SystemExit) as stop:
        calibrate.run(["--outputs", str(path), "--policy", "entropy", "--max-risk", "0.05", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_max_risk_is_required(capsys):
    with pytest.raises(SystemExit) as stop:
        calibrate.run(["--outputs", "x.npz", "--policy", "entropy"])
    assert stop.value.code == 2 and "--max-risk" in capsys.readouterr().err


# ---- infer/run.py --max-risk on the shared fine-tuned run ------------------------------------------------
@pytest.fixture(scope="module")
def minilm_model(trained_minilm_run):
    return EarlyExitModel.from_run(trained_minilm_run.path)


@pytest.fixture
def shared_model(monkeypatch, trained_minilm_run, minilm_model):
    """One model instance for this module's commands (a new one compiles its steps again)."""
    monkeypatch.setattr(infer, "EarlyExitModel", types.SimpleNamespace(from_run=lambda path: minilm_model))
    return minilm_model


def dev_outputs(run, model, limit: int):
    split, _ = load_inputs(run, model, glue.get_task("sst2"), "validation", str(GLUE / "SST-2"), limit=limit)
    return runners.cached_logits(model, split), split.labels


def test_max_risk_certifies_on_half_of_dev_and_reports_the_other(trained_minilm_run, shared_model, tmp_path, capsys):
    out = tmp_path / "cert.json"
    result = infer.run(["--checkpoint", str(trained_minilm_run.path), "--policy", "maxprob", "--max-risk", "0.1",
                        "--limit", "160", "--split-seed", "3", "--json", str(out)])
    cert = result["certification"]
    printed = capsys.readouterr().out
    assert cert["summary"] in printed and "report half (80 inputs): realised consistency risk" in printed
    assert cert["certificate"]["n"] == 80 and cert["split_seed"] == 3 and cert["report"]["n"] == 80
    assert json.loads(out.read_text())["certification"]["certificate"] == cert["certificate"]
    # the report half's realised risk: how often the chosen setting's answer differs from the full model's
    cached, labels = dev_outputs(trained_minilm_run, shared_model, 160)
    report_rows = offline.split_halves(160, 3)[1]
    chosen = policies.make_policy("maxprob", 6, 2, **cert["certificate"]["params"])
    ev = offline.evaluate(chosen, cached[:, report_rows])
    full = offline.ramp_predictions(cached[:, report_rows])[-1]
    assert cert["report"]["risk"] == pytest.approx(np.mean(ev.prediction != full))
    assert cert["report"]["saving"] == pytest.approx(ev.saving)


def test_max_risk_on_unlabelled_texts_reports_on_the_whole_split(trained_minilm_run, shared_model, tmp_path, capsys):
    task = glue.get_task("sst2")
    texts = [e.text_a for e in glue.load_examples(task, "validation", str(require(GLUE / "SST-2")))[400:520]]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts[:60]) + "\n\n   \n" + "\n".join(texts[60:]) + "\n")  # blank lines skipped
    result = infer.run(["--checkpoint", str(trained_minilm_run.path), "--policy", "entropy", "--max-risk", "0.1",
                        "--risk-bound", "hb", "--calibration-texts", str(path), "--limit", "64",
                        "--json", str(tmp_path / "c.json")])
    cert = result["certification"]
    assert cert["calibration_inputs"] == 120 and cert["certificate"]["n"] == 120
    assert cert["certificate"]["method"] == "hb" and cert["report"]["n"] == 64
    printed = capsys.readouterr().out
    assert "certified on 120 unlabelled calibration texts" in printed and "the split (64 inputs)" in printed


def test_max_risk_errors(trained_minilm_run, shared_model, tmp_path, capsys):
    ckpt = str(trained_minilm_run.path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    texts = tmp_path / "texts.txt"
    texts.write_text("a fine film\n")
    for argv, message in [
        (["--max-risk", "0"], "--max-risk must be in (0, 1)"),
        (["--max-risk", "1"], "--max-risk must be in (0, 1)"),
        (["--max-risk", "0.1", "--risk-delta", "1.5"], "--risk-delta must be in (0, 1)"),
        (["--max-risk", "0.1", "--target-saving", "0.3"], "one calibration target"),
        (["--risk", "drop"], "--risk cannot apply here: it applies to certification (--max-risk) only"),
        (["--calibration-texts", str(texts)], "--calibration-texts cannot apply here"),
        (["--max-risk", "0.1", "--risk", "drop", "--calibration-texts", str(texts)], "--risk drop needs labels"),
        (["--max-risk", "0.1", "--calibration-texts", str(texts), "--split-seed", "1"], "--split-seed cannot apply"),
        (["--max-risk", "0.1", "--calibration-texts", str(tmp_path / "none.txt")], "does not exist"),
        (["--max-risk", "0.1", "--calibration-texts", str(empty)], "holds no text"),
        (["--max-risk", "0.1", "--risk-tolerance", "0.2"], "applies to regression only"),
        (["--max-risk", "0.1", "--split", "test"], "has no labels"),
        (["--max-risk", "0.1", "--risk", "drop", "--split", "test"], "the drop risk needs them"),
    ]:
        with pytest.raises(SystemExit) as stop:
            infer.run(["--checkpoint", ckpt, "--policy", "entropy", "--limit", "16", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_every_calibrate_flag_says_what_it_does():
    for action in calibrate.build_parser()._actions:
        assert action.help, action.option_strings
