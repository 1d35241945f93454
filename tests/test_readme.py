"""The README tells the truth: its offline quick start runs, and CI runs its install-and-test block."""

from __future__ import annotations

import re
import shlex
import subprocess

from conftest import GLUE, MINILM, REPO, require
from jaxexit.cli import finetune as finetune_cli, infer as run_cli

README = (REPO / "README.md").read_text()


def bash_block_after(text: str, marker: str) -> list[str]:
    """The command lines of the first ```bash block after `marker` (comments stripped)."""
    block = re.search(re.escape(marker) + r".*?```bash\n(.*?)```", text, re.S)
    assert block, f"README.md has no bash block after {marker!r}"
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def test_ci_runs_the_readme_install_and_test_block():
    lines = bash_block_after(README, "<!-- ci: install and test")
    assert any("requirements.txt" in line and "requirements-test.txt" in line for line in lines)
    assert lines[-1] == "python -m pytest -q"
    assert "$(.ci/readme-block)" in (REPO / ".ci" / "run").read_text()
    out = subprocess.run([str(REPO / ".ci" / "readme-block")], capture_output=True, text=True, check=True).stdout
    assert [line.split("  #")[0].strip() for line in out.splitlines() if line.strip()] == lines


def test_offline_quick_start_runs(tmp_path, monkeypatch, capsys):
    require(MINILM), require(GLUE / "SST-2")
    train_line, infer_line = bash_block_after(README, "Offline (a local Hugging Face checkpoint")
    assert train_line.startswith("python train/finetune.py") and infer_line.startswith("python infer/run.py")
    monkeypatch.chdir(REPO)  # the README's ../shared paths are relative to the checkout
    runs = str(tmp_path / "runs")
    # inputs cut to 16 tokens: every batch has one shape, so each step compiles once
    budget = ["--max-steps", "2", "--batch-size", "8", "--max-train-examples", "64", "--max-eval-examples", "32",
              "--max-length", "16", "--output-dir", runs, "--no-progress"]
    run = finetune_cli.run(shlex.split(train_line)[2:] + budget)
    assert (run.path / "summary.json").is_file()
    result = run_cli.run(shlex.split(infer_line)[2:] + ["--runs-dir", runs, "--limit", "8"])
    printed = capsys.readouterr().out
    assert result["policy"] == "pcee" and result["n"] == 8 and "wall saving" in printed
