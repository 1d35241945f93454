"""An exported directory where the tools take a run: the service starts from it alone (no run, no dev
data) and answers as from the run; jaxexit-infer and jaxexit-analyze report on it as on the run; the
model card holds the trade-off table, the certified settings, the plot and the load and serve lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

import tiny
from jaxexit import EarlyExitModel
from jaxexit.cli import analyze as analyze_cli
from jaxexit.cli import export as export_cli
from jaxexit.cli import infer as infer_cli
from jaxexit.cli.infer import format_summary
from jaxexit.exits import offline, risk, runners
from jaxexit.serving import service as service_module
from jaxexit.serving.app import create_app
from jaxexit.serving.service import build_service
from jaxexit.serving.table import load_table
from jaxexit.text import batches, checkpoints, export, glue, metrics
from jaxexit.text.train_config import TrainConfig
from jaxexit.training.checkpoint import RunDir

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    """A tiny SST-2 run (mean ramps, their classifiers scaled so that confidences spread and policies
    exit at every layer), written as train/finetune.py writes one, and its export with a table on dev."""
    root = tmp_path_factory.mktemp("export-tools")
    ckpt, glue_root = tiny.make_tiny_checkpoint(root / "model"), tiny.make_tiny_glue(root / "glue", dev=120)
    data = glue_root / "SST-2"
    model = EarlyExitModel.from_pretrained(ckpt, num_labels=2, ramp_input="mean", max_length=32, seed=3)
    params = jax.tree_util.tree_map(np.asarray, model.params)
    for ramp in params["ramps"].values():
        ramp["classifier"]["kernel"] = ramp["classifier"]["kernel"] * 60.0
    cfg = TrainConfig(task="sst2", model=str(ckpt), data_dir=str(data), scheme="joint", max_length=32,
                      ramp_input="mean", output_dir=str(root / "runs"), run_name="sst2")
    run = RunDir.create(cfg.output_dir, "sst2", cfg.to_dict(), model.config, model.tokenizer)
    run.save_model(params, {"note": "written by the test, not trained"})
    out = export_cli.run([str(run.path), str(root / "exported" / "sst2")])
    return run.path, out, data


def _dev_texts(data: Path, n: int = 32) -> list[str]:
    return [ex.text_a for ex in glue.load_examples(glue.get_task("sst2"), "validation", data)][:n]


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ---- the service ------------------------------------------------------------------------------------------
def test_service_from_the_export_alone_answers_as_from_the_run(fab, tmp_path, monkeypatch):
    run, out, data = fab
    caches = []
    monkeypatch.setattr(service_module, "use_compile_cache", lambda directory: caches.append(Path(directory)))
    before = _files(out)
    moved = data.with_name("elsewhere")
    data.rename(moved)  # no dev data anywhere: the export's table alone
    try:
        exported = build_service(str(out), runs_dir=str(tmp_path / "no-runs"), start={"target_saving": 0.3},
                                 require_table=True, max_batch=2, max_wait_s=0.01)
    finally:
        moved.rename(data)
    from_run = build_service(str(run), start={"target_saving": 0.3}, require_table=True, max_batch=2,
                             max_wait_s=0.01)
    try:
        assert caches == [out.with_name("sst2.jaxexit") / "serving" / "xla-cache", run / "serving" / "xla-cache"]
        assert _files(out) == before  # nothing written into the export
        assert exported.describe_policy()["table"] == from_run.describe_policy()["table"]
        texts, seen = _dev_texts(data), set()
        clients = [TestClient(create_app(service)) for service in (exported, from_run)]
        for spec in ({"target_saving": 0.3}, {"target_saving": 0.6, "policy": "entropy"},
                     {"max_risk": 0.1, "policy": "entropy"}, {"policy": "pcee", "patience": 1, "tau": 0.4}):
            answers = []
            for service, client in zip((exported, from_run), clients):
                service.set_policy(spec)
                reply = client.post("/v1/classify", json={"texts": texts})
                assert reply.status_code == 200, reply.text
                answers.append(reply.json())
            a, b = answers
            assert a["policy"] == b["policy"], spec
            assert [r["exit_layer"] for r in a["results"]] == [r["exit_layer"] for r in b["results"]], spec
            assert [r["label"] for r in a["results"]] == [r["label"] for r in b["results"]], spec
            np.testing.assert_allclose([r["probabilities"] for r in a["results"]],
                                       [r["probabilities"] for r in b["results"]], rtol=1e-6, atol=1e-7)
            seen.update(r["exit_layer"] for r in a["results"])
            if "max_risk" in spec:
                assert a["policy"]["certificate"]["certified"], a["policy"]
        assert seen == {1, 2, 3}  # the policies exit at every layer: the comparison is not vacuous
    finally:
        exported.close()
        from_run.close()


def test_service_from_an_export_without_a_table_says_what_it_needs(fab, tmp_path):
    _, out, data = fab
    bare = shutil.copytree(out, tmp_path / "bare")
    (bare / "calibration.npz").unlink()
    hf = json.loads((bare / "config.json").read_text())
    hf["early_exit"]["calibration"] = None
    (bare / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"no calibration table for --target-saving.*bare holds no calibration "
                                         r"table \(it was exported with --no-table\).*pass --data-dir"):
        build_service(str(bare), start={"target_saving": 0.3}, require_table=True, compile_cache=False)
    # with --data-dir the table is computed from the data, stored beside the export, not in it
    source = checkpoints.resolve_checkpoint(str(bare))
    task, model = checkpoints.task_and_model(source)
    computed = load_table(source, model, task, "validation", str(data))
    assert (tmp_path / "bare.jaxexit" / "serving" / "outputs-validation.npz").is_file()
    assert not (bare / "serving").exists()
    np.testing.assert_allclose(computed.outputs, export.read_table(out).outputs, rtol=1e-5, atol=1e-5)


# ---- jaxexit-infer and jaxexit-analyze ----------------------------------------------------------------------
def _without_timing(result: dict) -> dict:
    drop = ("checkpoint", "time_early_exit_s", "time_full_model_s", "wall_saving", "wall_speedup")
    return {k: v for k, v in result.items() if k not in drop}


def test_infer_on_the_export_reports_as_on_the_run(fab, tmp_path, capsys):
    run, out, data = fab
    flags = ["--policy", "entropy", "--S", "0.3", "--mode", "offline", "--limit", "40"]
    on_run = infer_cli.run(["--checkpoint", str(run), *flags, "--json", str(tmp_path / "run.json")])
    on_export = infer_cli.run(["--checkpoint", str(out), *flags, "--data-dir", str(data)])
    assert _without_timing(on_export) == _without_timing(on_run)
    lines = lambda r: [x for x in format_summary(r).splitlines() if not x.startswith("time:")]  # noqa: E731
    assert lines(on_export) == lines(on_run)
    assert (out.with_name("sst2.jaxexit") / "infer").is_dir() and not (out / "infer").exists()

    # offline jobs read the export's table: no data at all
    certify = ["--policy", "entropy", "--max-risk", "0.1"]
    cert_run = infer_cli.run(["--checkpoint", str(run), *certify, "--json", str(tmp_path / "c.json")])
    cert_export = infer_cli.run(["--checkpoint", str(out), *certify, "--json", str(tmp_path / "d.json")])
    assert "calibration.npz (no data read)" in capsys.readouterr().out
    assert cert_export["certification"] == cert_run["certification"]

    said = infer_cli.run(["--checkpoint", str(out), "--policy", "entropy", "--S", "0.3", "--text", "a good film"])
    assert said == infer_cli.run(["--checkpoint", str(run), "--policy", "entropy", "--S", "0.3",
                                  "--text", "a good film"])


def test_infer_on_an_export_without_data_says_what_it_needs(fab, capsys):
    _, out, _ = fab
    for argv, words in ((["--policy", "entropy", "--S", "0.3"], "pass --data-dir"),
                        (["--split", "test", "--sweep"], "calibration table on validation only, not SST-2 test")):
        with pytest.raises(SystemExit) as e:
            infer_cli.run(["--checkpoint", str(out), *argv])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_analyze_on_the_export_reads_its_table(fab, tmp_path, capsys):
    run, out, data = fab
    on_export = analyze_cli.run([str(out), "--out", str(tmp_path / "export")])
    assert "no wall-saving timing" in capsys.readouterr().out and "timing" not in on_export
    assert (tmp_path / "export" / "tables.md").is_file() and (tmp_path / "export" / "risk.md").is_file()
    # the same ramp outputs as the run's on its dev split, so the same analysis
    model, task = EarlyExitModel.from_run(run), glue.get_task("sst2")
    split = batches.encode_examples(model.tokenizer, task, glue.load_examples(task, "validation", data))
    logits = offline.parts(runners.cached_logits(model, split))[0]
    assert on_export["n"] == len(split.labels) and on_export["scheme"] == "joint"
    assert on_export["full_score"] == metrics.primary_scorer(task)(logits[-1].argmax(-1), split.labels)
    assert [m["accuracy"] for m in on_export["per_layer"]] == [
        metrics.primary_scorer(task)(z.argmax(-1), split.labels) for z in logits]


def test_plain_checkpoints_and_taskless_exports_are_refused_by_name(fab, tmp_path, capsys):
    _, out, _ = fab
    plain = tiny.make_tiny_checkpoint(tmp_path / "plain")
    with pytest.raises(SystemExit):
        analyze_cli.run([str(plain), "--out", str(tmp_path / "a")])
    assert "plain Hugging Face checkpoint" in capsys.readouterr().err
    taskless = export.save_pretrained(export.load_pretrained(out), tmp_path / "taskless")
    with pytest.raises(ValueError, match=r"taskless/config\.json: early_exit\.task is null"):
        checkpoints.task_and_model(checkpoints.resolve_checkpoint(str(taskless)))


# ---- the model card -----------------------------------------------------------------------------------------
def test_model_card_renders_with_tradeoff_certified_settings_plot_and_use(fab):
    _, out, _ = fab
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "jaxexit" and "early-exit" in header["tags"]
    assert header["datasets"] == ["glue"] and header["metrics"] == ["accuracy"]
    assert (out / "tradeoff.png").read_bytes()[:8] == PNG and "](tradeoff.png)" in card

    table = export.read_table(out)
    scorer = metrics.primary_scorer("sst2")
    for label in offline.applicable(2):
        assert f"| {label} | 0.25 |" in card and f"| {label} | 0.75 |" in card
    rows = offline.sweep(table.outputs, table.labels, scorer, {"entropy": None})
    best = max(r["score"] for r in rows if r["saving"] >= 0.25 - 1e-9)
    row = next(line for line in card.splitlines() if line.startswith("| entropy | 0.25 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]  # policy, target, saving, avg layers, score, drop, setting
    assert float(cells[2]) >= 0.25 - 5e-4 and abs(float(cells[4]) - best) < 1e-4
    for label in ("entropy", "pcee"):
        for eps in (0.01, 0.02, 0.05):
            cert = risk.certify(label, table.outputs, max_risk=eps, delta=0.1)
            line = next(x for x in card.splitlines() if x.startswith(f"| {label} | {eps:g} |"))
            assert all(f"{k}=" in line for k in cert.params) if cert.certified else "| none: " in line
    assert 'EarlyExitModel.from_pretrained("sst2")' in card and "jaxexit-serve --checkpoint sst2" in card
    assert "## Training" in card and "* scheme: `joint`" in card
