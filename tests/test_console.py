"""What the command-line tools print: flags with one line of help each, one-line user errors, a
console free of library chatter (which goes to the run's train.log)."""

from __future__ import annotations

import pytest

import tiny
from jaxexit.cli import finetune as finetune_cli, infer as run_cli
from jaxexit.text import train_config


def _help(module, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_finetune_flag_says_what_it_does(capsys):
    text = _help(finetune_cli, capsys).split("options:", 1)[1]  # past the usage lines
    fields = [f for f in train_config.dataclasses.fields(train_config.TrainConfig) if f.name != "task"]
    for field in fields:
        assert field.metadata["help"], field.name
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
        assert field.metadata["help"].split()[0] in text.split(flag, 1)[1][:300], flag  # the help follows the flag
    assert "{two_stage,joint,alternate}" in text and "{per_ramp,shared}" in text and "--no-skip-bad-rows" in text
    assert "(preset: " in text and "task preset" in text


def test_every_run_flag_says_what_it_does(capsys):
    parser = run_cli.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = _help(run_cli, capsys)
    assert "{latency,batched,device,offline}" in text and "{entropy,maxprob,learned}" in text
    assert "{entropy,pcee,maxprob,pabee,static,berxit" in text  # and any policy registered since


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-org/no-such-model"], "error: cannot load model 'no-such-org/no-such-model': it is not a "
                                               "local directory and HF_HUB_OFFLINE is set"),
    (["--model", "../shared/models/all-MiniLM"], "error: checkpoint directory ../shared/models/all-MiniLM does not exist"),
    (["--scheme", "jiont"], "error: argument --scheme: expected one of two_stage, joint, alternate, got 'jiont'"),
    (["--max-length", "1"], "error: --max-length must be in [2, 4096], got 1"),
    (["--config", "sst3"], "error: unknown config 'sst3'"),
    (["--resume", "nowhere"], "error: cannot resume nowhere: not a train/finetune.py run directory"),
])
def test_finetune_user_errors_are_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(SystemExit) as exit_:
        finetune_cli.main([*argv, "--output-dir", str(tmp_path / "runs")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run left behind


def test_data_errors_leave_no_run_directory(capsys, tmp_path):
    model = tiny.make_tiny_checkpoint(tmp_path / "model")
    with pytest.raises(SystemExit):
        finetune_cli.main(["--model", str(model), "--data-dir", str(tmp_path / "nodata"), "--max-length", "32",
                           "--output-dir", str(tmp_path / "runs")])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: GLUE data directory not found")
    assert not (tmp_path / "runs").exists()


def test_console_shows_progress_and_tables_and_library_chatter_goes_to_train_log(capfd, tmp_path):
    model, data = tiny.make_tiny_checkpoint(tmp_path / "model"), tiny.make_tiny_glue(tmp_path / "glue")
    run = finetune_cli.run(["--model", str(model), "--data-dir", str(data / "SST-2"), "--batch-size", "8",
                             "--max-steps", "3", "--max-length", "32", "--output-dir", str(tmp_path / "runs"),
                             "--run-name", "r"])
    out, err = capfd.readouterr()
    console = out + err
    assert "SST-2 dev, stage 2, epoch 1 (per ramp):" in console and "stage 1:" in console  # tables, progress
    assert "orbax" not in console.lower() and "absl" not in console and "INFO" not in console
    assert len([line for line in out.splitlines() if line.strip()]) <= 30
    log = (run.path / "train.log").read_text()
    assert "absl" in log and "Saving checkpoint" in log  # orbax's chatter, kept in the run directory
    assert "jaxexit.text.trainer: SST-2: 200 train examples" in log  # records from before the run dir existed too


def test_finetune_bad_rows_stop_by_default_and_are_skipped_with_the_flag(capfd, tmp_path):
    model, data = tiny.make_tiny_checkpoint(tmp_path / "model"), tiny.make_tiny_glue(tmp_path / "glue")
    train = data / "SST-2" / "train.tsv"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:5] + ["a broken row without its label"] + lines[5:]) + "\n")
    argv = ["--model", str(model), "--data-dir", str(data / "SST-2"), "--batch-size", "8", "--max-steps", "1",
            "--max-length", "32", "--output-dir", str(tmp_path / "runs"), "--no-progress"]
    with pytest.raises(SystemExit):
        finetune_cli.main(argv + ["--run-name", "strict"])
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {train}:6: expected 2 tab-separated fields")
    run = finetune_cli.run(argv + ["--run-name", "lenient", "--skip-bad-rows"])
    err = capfd.readouterr().err
    assert f"warning: skipped 1 malformed row of {train} ({train}:6: expected 2" in err
    assert "SST-2: 200 train examples" in err and run.path.name == "lenient"
