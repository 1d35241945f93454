"""jaxexit-analyze (infer/analyze.py): the papers' tables and figures from one run; tables gathered over seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tiny
from jaxexit import analysis
from jaxexit.analysis.markdown import _wall_saving
from jaxexit.cli import analyze as analyze_cli
from jaxexit.exits import offline, runners
from jaxexit.text import metrics
from jaxexit.text.train_config import TrainConfig
from jaxexit.text.trainer import finetune


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    model, data = tiny.make_tiny_checkpoint(root / "model"), tiny.make_tiny_glue(root / "glue", dev=60)
    runs = {}
    for seed in (1, 2):
        cfg = TrainConfig(task="sst2", model=str(model), data_dir=str(data / "SST-2"), scheme="joint", batch_size=8,
                          max_length=32, lr=1e-2, epochs=1.0, seed=seed, output_dir=str(root / "runs"),
                          run_name=f"joint-s{seed}")
        runs[seed] = finetune(cfg, progress=False).path
    return root, runs


def test_analyze_writes_tables_figures_and_held_out_numbers(tiny_runs, capsys):
    root, runs = tiny_runs
    out = root / "out1"
    result = analyze_cli.run([str(runs[1]), "--out", str(out), "--timing-inputs", "8"])
    for name in ("analysis.json", "tables.md", "logits.npy", "tradeoff.csv", "tradeoff.png", "per_layer.png",
                 "exit_histograms.png", "wall_saving.png", "pcee_patience.png", "pcee_variants.png", "ensemble.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "analysis.json").read_text())
    assert json.dumps(result, indent=1) + "\n" == (out / "analysis.json").read_text()  # main() returns what it wrote
    assert saved["command"].startswith("python infer/analyze.py") and saved["n"] == 60
    logits = np.load(out / "logits.npy")
    labels = np.asarray([int(line.rsplit("\t", 1)[1]) for line in
                         (root / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]])
    # Every PCEE-table entry: chosen on the seeded calibration half, scored on the report half exactly
    # as evaluating its setting there.
    cal_rows, report_rows = offline.split_halves(60, seed=0)
    assert saved["split_seed"] == 0 and (saved["calibration_n"], saved["report_n"]) == (30, 30)
    assert not np.array_equal(report_rows, np.arange(30, 60))  # not the contiguous second half
    for row in saved["pcee"]:
        if "params" not in row:
            continue
        policy = offline.Policy(row["policy"], 3, 2, tuple(row["params"].items()))
        report = offline.evaluate(policy, logits[:, report_rows], labels[report_rows], metrics.accuracy)
        assert report.score == pytest.approx(row["score"]) and report.saving == pytest.approx(row["saving"])
        cal = offline.evaluate(policy, logits[:, cal_rows], labels[cal_rows], metrics.accuracy)
        assert cal.saving == pytest.approx(row["calibration_saving"])
        if row["rule"].startswith("max score"):  # else no setting was within the band: the nearest was taken
            assert abs(cal.saving - row["near_saving"]) <= offline.SAVING_BAND + 1e-9
    assert [r["max_drop"] for r in saved["deebert"]] == list(analysis.DEEBERT_DROPS)
    assert {r["policy"] for r in saved["pcee"]} == set(offline.applicable(2, lte=False))  # no berxit: no LTE
    assert {"entropy", "pcee", "maxprob", "pabee", "static"} <= set(offline.applicable(2, lte=False))
    assert saved["timing"]["inputs"] == 8 and saved["timing"]["settings"]
    # Each DeeBERT row's chosen setting was timed; its wall saving is in the table cell.
    table = capsys.readouterr().out
    assert "DeeBERT Table 1 form" in table
    for row in saved["deebert"]:
        if "params" in row:
            wall = _wall_saving(saved, row)
            assert wall is not None
            assert f"{100 * row['score']:.1f} ({100 * row['saving']:.1f}%, wall {100 * wall:.1f}%)" in table
    # PCEE-BERT Figures 7/8: every tau of the grid at patience 1, 2 (L = 3), on the whole split.
    curves = saved["pcee_curves"]
    assert [c["patience"] for c in curves["curves"]] == [1, 2] and len(curves["taus"]) == 101
    for c in curves["curves"]:
        for i in (0, 37, 100):
            ev = offline.evaluate(offline.Policy("pcee", 3, 2, (("patience", c["patience"]), ("tau", curves["taus"][i]))),
                                  logits, labels, metrics.accuracy)
            assert (c["score"][i], c["saving"][i], c["avg_layers"][i]) == (ev.score, ev.saving, ev.avg_layers)
        assert c["saving"][0] == 0.0 and max(c["saving"]) <= 1 - c["patience"] / 3 + 1e-12
        assert c["largest_step"] == max(abs(b - a) for a, b in zip(c["saving"], c["saving"][1:]))
    assert [r["params"] for r in curves["pabee"]] == [{"patience": p} for p in (1, 2, 3)]
    assert "PCEE-BERT Figure 8 form" in table


def test_tables_report_mean_and_spread_over_seeds(tiny_runs):
    root, runs = tiny_runs
    results = [analysis.analyze(runs[s], root / f"seed{s}", timing_inputs=0) for s in (1, 2)]
    text = analysis.tables(analysis.load_analyses([root / "seed1", root / "seed2"]), command="cmd")
    full = [100 * r["full_score_report"] for r in results]
    assert f"| SST-2 (accuracy, entropy) | 2 | {np.mean(full):.1f} ± {np.std(full, ddof=1):.1f} |" in text
    assert "static (reference)" in text and "Made by: `cmd`" in text
    assert "| drop < 0.5 | drop <= 1 | drop <= 4 |" in text
    assert "(SST-2 validation: 30 calibration / 30 report inputs, split seed 0)" in text  # once per task
    reseeded = analysis.analyze(runs[1], root / "seed1-other-split", timing_inputs=0, split_seed=7)
    logits = np.load(root / "seed1" / "logits.npy")
    labels = np.asarray([int(line.rsplit("\t", 1)[1]) for line in
                         (root / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]])
    for result, seed in ((results[0], 0), (reseeded, 7)):
        _, report_rows = offline.split_halves(60, seed)
        assert result["split_seed"] == seed
        assert result["full_score_report"] == offline.full_score(logits[:, report_rows], labels[report_rows],
                                                                 metrics.accuracy)
    with pytest.raises(ValueError, match="predates seeded calibration halves"):
        analysis.tables([{k: v for k, v in results[0].items() if k != "split_seed"}])
    # Runs named <setup>-s<seed> are seeds of one setup; another setup of the task gets its own rows.
    loaded = analysis.load_analyses([root / "seed1", root / "seed2"])
    other = dict(loaded[0], checkpoint="runs/other-setup")
    text = analysis.tables(loaded + [other])
    assert "| SST-2 `joint` (accuracy, entropy) | 2 |" in text
    assert "| SST-2 `other-setup` (accuracy, entropy) | 1 |" in text


def test_analyze_refuses_missing_paths(tiny_runs):
    root, runs = tiny_runs
    with pytest.raises(SystemExit):
        analyze_cli.run([str(root / "nope"), "--out", str(root / "x")])
    with pytest.raises(SystemExit):
        analyze_cli.run(["--tables", str(root / "empty-dir-that-is-missing"), "--out", str(root / "t.md")])


def test_wall_savings_pair_each_setting_with_the_full_model_and_take_the_median():
    # A fake clock: the machine runs 3x slower in round 2 (both sides of each pair), and setting b's
    # round 3 is disturbed alone. Paired ratios cancel the slow spell; the median drops the outlier.
    slow = iter([1, 1, 3, 3, 1, 1])  # the factor of each (full, setting) pair, in call order
    base = {2: 0.4, 3: 0.6}  # seconds per full-model second, by static exit layer
    calls = []

    class FakeModel:
        num_layers = 4

    def full_latency(model, split):
        calls.append("full")
        full_latency.factor = next(slow)
        return None, 1.0 * full_latency.factor

    def latency(model, policy, split):
        k = dict(policy.params)["k"]
        calls.append(k)
        seconds = base[k] * full_latency.factor
        if k == 3 and calls.count(3) == 3:
            seconds *= 2.5
        return runners.Exits(np.asarray([1, 2, 4]), np.zeros(3, int), np.zeros((3, 2)), seconds)

    settings = [offline.Policy("static", 4, 2, (("k", 2),)), offline.Policy("static", 4, 2, (("k", 3),))]
    timing = analysis.wall_savings(FakeModel(), [0, 1, 2], settings, full_latency, latency, rounds=3)
    assert calls == ["full", 2, "full", 3] * 3  # alternated, each setting right after the full model
    a, b = timing["settings"]
    assert a["wall_saving"] == pytest.approx(0.6) and a["wall_saving_rounds"] == pytest.approx([0.6] * 3)
    assert b["wall_saving"] == pytest.approx(0.4) and b["wall_saving_rounds"] == pytest.approx([0.4, 0.4, -0.5])
    assert a["saving"] == pytest.approx(1 - (7 / 3) / 4) and timing["rounds"] == 3
    assert timing["full_model_seconds"] == pytest.approx(1.0)  # median of 1, 1, 3, 3, 1, 1


def test_table1_caption_says_how_wall_was_timed():
    timed = lambda rounds: {"timing": {"inputs": 8, **({"rounds": rounds} if rounds else {})}}  # noqa: E731
    assert analysis.timing_rounds([timed(None)]) == ""
    assert "median over 3 rounds" in analysis.timing_rounds([timed(3)])
    both = analysis.timing_rounds([timed(3), timed(None), {}])
    assert "median over 3 rounds" in both and "without rounds: one measurement" in both
