"""Multi-process training, proven on loopback: two processes joined through `jax.distributed`
(coordinator on 127.0.0.1, CPU collectives through gloo, one device each) train the tiny model to
the parameters of one process with two forced host devices; a SIGTERM reaching one of the two
stops both at the same step with its state saved, and the two resume it to the same parameters
(the one-process run goes straight through). Every process is a fresh interpreter (`jax.distributed` must come first)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny
from jaxexit.training import parallel
from jaxexit.training.checkpoint import RunDir

REPO = Path(__file__).resolve().parents[1]
STEPS, STOP_AT = 6, 3  # one epoch of 6 steps, checkpointed at its end only: the stop at step 3 saves its own
TIMEOUT_S = 300

# The library path: the environment a launcher sets, and a SIGTERM sent to process 1 alone.
STOPPED_SCRIPT = """
import json, os, signal, sys
from jaxexit.text.train_config import TrainConfig
from jaxexit.text import trainer
from jaxexit.training.checkpoint import Stopped

def sigterm_on_process_1(run, stage, step):
    if step == {stop_at} and os.environ["JAXEXIT_PROCESS_ID"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)

try:
    trainer.finetune(TrainConfig.from_dict({cfg!r}), progress=False, on_step=sigterm_on_process_1)
except Stopped as e:
    print(json.dumps({{"global_step": e.global_step, "signal": e.signal_name}}))
"""


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny.make_tiny_checkpoint(root / "model"), tiny.make_tiny_glue(root / "glue", train=48, dev=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    launcher = ("JAXEXIT_NUM", "JAXEXIT_PROCESS", "JAXEXIT_DISTRIBUTED", "JAX_COORD")
    out = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    out.update({"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "XLA_FLAGS": "", **extra})
    return out


def flags(model: Path, data: Path, output: Path, run_name: str) -> list[str]:
    """The finetune command's flags of a tiny joint run of STEPS steps, evaluated at its end only."""
    return ["--config", "sst2", "--model", str(model), "--data-dir", str(data / "SST-2"), "--scheme", "joint",
            "--batch-size", "8", "--eval-batch-size", "16", "--max-length", "32", "--lr", "1e-2", "--epochs", "1",
            "--max-steps", str(STEPS), "--save-every", "100", "--log-every", "1", "--seed", "7",
            "--output-dir", str(output), "--run-name", run_name, "--no-progress"]


def start(command: list[str], environment: dict) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    """Every process's stdout once all have ended with status 0 (the others killed if one fails)."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, f"process {procs.index(p)} exited {p.returncode}:\n{err[-4000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def two_processes(command: list[str], extra_flags=True) -> list[subprocess.Popen]:
    """`command` as processes 0 and 1 of a run on loopback: by flags (the command line) or by the
    environment a launcher sets (`extra_flags=False`)."""
    port = free_port()
    procs = []
    for pid in (0, 1):
        if extra_flags:
            procs.append(start(command + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                          "--process-id", str(pid)], env()))
        else:
            procs.append(start(command, env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXEXIT_NUM_PROCESSES="2",
                                            JAXEXIT_PROCESS_ID=str(pid))))
    return procs


def leaves(run: RunDir) -> dict[str, np.ndarray]:
    """The run's final parameters as inference loads them (in this process: one device)."""
    import jax

    from jaxexit import EarlyExitModel

    flat = jax.tree_util.tree_flatten_with_path(EarlyExitModel.from_run(run.path).params)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def train_losses(run: RunDir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in run.records() if r["kind"] == "train"]


def assert_same(a: RunDir, b: RunDir) -> None:
    x, y = leaves(a), leaves(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_two_processes_train_stop_and_resume_as_one_process_with_two_devices(tiny_setup, tmp_path):
    """Processes 0 and 1 (joined by the environment, the library's path) train; a SIGTERM to process 1
    alone at step 3 stops both with step 3 saved; both resume (joined by the command's flags) to step
    6. Meanwhile one process with two forced host devices trains the same 6 steps straight: every
    step's loss, the final parameters and the final dev scores agree."""
    model, data = tiny_setup
    finetune = [sys.executable, "train/finetune.py"]
    out = tmp_path / "runs"
    one = start(finetune + flags(model, data, out, "one"), env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    cfg = {"task": "sst2", "model": str(model), "data_dir": str(data / "SST-2"), "scheme": "joint", "batch_size": 8,
           "eval_batch_size": 16, "max_length": 32, "lr": 1e-2, "epochs": 1.0, "max_steps": STEPS, "save_every": 100,
           "log_every": 1, "seed": 7, "output_dir": str(out), "run_name": "two"}
    script = STOPPED_SCRIPT.format(cfg=cfg, stop_at=STOP_AT)
    outs = finish([*two_processes([sys.executable, "-c", script], extra_flags=False), one])
    stopped = [json.loads(o.strip().splitlines()[-1]) for o in outs[:2]]
    assert stopped == [{"global_step": STOP_AT, "signal": "a signal to another process"},
                       {"global_step": STOP_AT, "signal": "SIGTERM"}]
    two, one = RunDir(out / "two"), RunDir(out / "one")
    assert not two.has_model() and two.latest_meta()["step"] == STOP_AT
    assert [s for s, _ in train_losses(two)] == list(range(1, STOP_AT + 1))

    finish(two_processes(finetune + ["--resume", str(two.path), "--no-progress"]))
    for run in (one, two):
        assert run.has_model()
        assert [s for s, _ in train_losses(run)] == list(range(1, STEPS + 1))  # written once, by process 0
    summaries = {r.path.name: json.loads((r.path / "summary.json").read_text()) for r in (one, two)}
    assert summaries["one"]["devices"] == summaries["two"]["devices"] == 2
    np.testing.assert_allclose([l for _, l in train_losses(two)], [l for _, l in train_losses(one)], rtol=1e-5)
    assert_same(two, one)
    assert summaries["two"]["per_layer"] == summaries["one"]["per_layer"]


# ---- the flags and their errors (no second process) ----------------------------------------------
def test_multiprocess_flags_and_environment():
    from jaxexit.cli import finetune as cli

    args = cli.build_parser().parse_args(["--coordinator", "10.0.0.1:1234", "--num-processes", "2",
                                          "--process-id", "1"])
    assert cli.distributed(args) == parallel.Distributed("10.0.0.1:1234", 2, 1, False)
    assert not cli.distributed(cli.build_parser().parse_args([])).requested
    assert cli.distributed(cli.build_parser().parse_args(["--distributed"])).requested
    environment = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAXEXIT_NUM_PROCESSES": "4", "JAXEXIT_PROCESS_ID": "3"}
    assert parallel.Distributed(process_id=0).or_else(parallel.Distributed.from_env(environment)) == \
        parallel.Distributed("h:1", 4, 0, False)  # a flag wins over the environment, even 0
    with pytest.raises(ValueError, match="JAXEXIT_NUM_PROCESSES='two': expected an integer"):
        parallel.Distributed.from_env({"JAXEXIT_NUM_PROCESSES": "two"})
    parallel.request_distributed(parallel.Distributed("h:1", 2, 2))
    try:  # refused before jax is asked to join
        with pytest.raises(ValueError, match=r"--process-id 2: expected 0..1"):
            parallel.maybe_initialize_distributed()
    finally:
        parallel.request_distributed(parallel.Distributed())


def test_an_incomplete_multiprocess_launch_is_one_error_line(tiny_setup, tmp_path):
    model, data = tiny_setup
    clean = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_", "TPU_"))}
    proc = subprocess.run([sys.executable, "train/finetune.py", *flags(model, data, tmp_path / "runs", "r"),
                           "--num-processes", "2", "--process-id", "0"], cwd=REPO, env=clean, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot join a multi-process run") and "--coordinator HOST:PORT" in last, last
    assert not (tmp_path / "runs" / "r").exists()
