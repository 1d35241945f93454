"""MNLI: `dev` means the matched and the mismatched dev sets, reported side by side (as GLUE does),
in training, jaxexit-infer and jaxexit-analyze."""

from __future__ import annotations

import json

import pytest

import tiny
from conftest import REPO
from jaxexit.cli import analyze as analyze_cli, infer as run_cli
from jaxexit.text.train_config import TrainConfig
from jaxexit.text.trainer import finetune

FIXTURES = REPO / "tests" / "fixtures" / "glue"

SPLITS = ("validation_matched", "validation_mismatched")


@pytest.fixture(scope="module")
def mnli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnli")
    cfg = TrainConfig(task="mnli", model=str(tiny.make_tiny_checkpoint(root / "model")), data_dir=str(FIXTURES),
                      scheme="joint", batch_size=2, eval_batch_size=4, max_length=32, lr=1e-3, epochs=1.0,
                      output_dir=str(root / "runs"), run_name="mnli")
    return finetune(cfg, progress=False)


def test_training_evaluates_both_dev_sets(mnli_run):
    summary = json.loads((mnli_run.path / "summary.json").read_text())
    assert set(summary["final_ramp"]) == set(SPLITS)


def test_run_reports_matched_and_mismatched_side_by_side(mnli_run, tmp_path, capsys):
    result = run_cli.run(["--checkpoint", str(mnli_run.path), "--policy", "entropy", "--S", "0.5",
                          "--json", str(tmp_path / "r.json")])
    assert set(result["splits"]) == set(SPLITS)
    assert [result["splits"][s]["n"] for s in SPLITS] == [3, 2]
    printed = capsys.readouterr().out
    assert "MNLI, side by side:" in printed
    assert all(f"  {s}" in printed.split("side by side:")[1] for s in SPLITS)
    for s in SPLITS:  # one JSON file per split, named after it
        assert json.loads((tmp_path / f"r-{s}.json").read_text())["split"] == s
    one = run_cli.run(["--checkpoint", str(mnli_run.path), "--policy", "entropy", "--S", "0.5",
                       "--split", "dev_mismatched", "--json", str(tmp_path / "one.json")])
    assert one["split"] == "validation_mismatched" and (tmp_path / "one.json").is_file()


def test_calibration_on_both_dev_sets(mnli_run, tmp_path):
    result = run_cli.run(["--checkpoint", str(mnli_run.path), "--policy", "maxprob", "--target-saving", "0.0",
                          "--json", str(tmp_path / "c.json")])
    assert {s: result["splits"][s]["calibration"]["split_seed"] for s in SPLITS} == {s: 0 for s in SPLITS}


def test_analyze_writes_one_analysis_per_dev_set(mnli_run, tmp_path):
    out = tmp_path / "analysis"
    results = analyze_cli.run([str(mnli_run.path), "--out", str(out), "--timing-inputs", "0"])
    assert set(results) == set(SPLITS)
    for s in SPLITS:
        assert json.loads((out / s / "analysis.json").read_text())["split"] == s
    text = analyze_cli.run(["--tables", str(out), "--out", str(tmp_path / "t.md")])
    assert "| MNLI matched (accuracy, entropy) |" in text and "| MNLI mismatched (accuracy, entropy) |" in text
