"""Shared fixtures: paths to ../shared (real data and weights) and a loaded MiniLM model."""

from __future__ import annotations

import atexit
import csv
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the whole session, shared by the pytest-xdist workers and
# the subprocesses the tests start (through the environment, set by the first process and inherited):
# tests build many models of the same shapes, and each new model's jitted steps would otherwise
# compile the same programs again (a second tiny model's first pass: 2.2 s -> 0.5 s). Fresh per
# session, so a run never depends on what an earlier one left.
if "JAXEXIT_TEST_XLA_CACHE" not in os.environ:
    os.environ["JAXEXIT_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxexit-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXEXIT_TEST_XLA_CACHE"], ignore_errors=True)
_CACHE = os.environ["JAXEXIT_TEST_XLA_CACHE"]
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # two test workers can share one GPU
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
import jax  # noqa: E402  (after the environment: jax reads it on import; set again in case it was imported)

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
GLUE = SHARED / "data" / "glue"
GOLDEN_MINILM = REPO / "tests" / "golden" / "minilm_sst2_hidden.npz"


def require(path: Path) -> Path:
    """Skip (visibly) when a file from ../shared is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found: real-data tests need ../shared beside the repository")
    return path


def sst2_parity_sentences() -> list[str]:
    """17 SST-2 dev sentences of spread-out lengths (deterministic), padded together in tests."""
    with open(require(GLUE / "SST-2" / "dev.tsv"), newline="", encoding="utf-8") as f:
        rows = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:201]
    return sorted(rows, key=len)[::12]


@pytest.fixture(scope="session")
def minilm():
    from jaxexit import EarlyExitModel

    return EarlyExitModel.from_pretrained(require(MINILM), num_labels=2)


@pytest.fixture(scope="session")
def trained_minilm_run(tmp_path_factory):
    """MiniLM fine-tuned briefly on SST-2 (two stages, 40 steps each): a real checkpoint for
    training and inference tests. Trained once per session: the pytest-xdist workers share it
    through a lock in their common temporary directory (the first to ask trains, the others wait
    and read it)."""
    from filelock import FileLock

    from jaxexit.text.train_config import TrainConfig
    from jaxexit.text.trainer import finetune
    from jaxexit.training.checkpoint import RunDir

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common directory for this session
    runs = root / "shared-runs"
    with FileLock(str(root / "minilm-run.lock")):
        if (runs / "minilm" / "summary.json").is_file():
            return RunDir(runs / "minilm")
        cfg = TrainConfig(task="sst2", model=str(require(MINILM)), data_dir=str(require(GLUE / "SST-2")),
                          scheme="two_stage", max_steps=40, batch_size=16, lr=2e-4, epochs=1.0,
                          max_train_examples=2000, max_eval_examples=200, eval_batch_size=100,
                          output_dir=str(runs), run_name="minilm", log_every=10)
        return finetune(cfg, progress=False)


# The slowest test files first, so that the two workers (each taking whole files) do not end with one
# long file alone; the second starts on a file that needs no trained run while the first trains it.
# The rest keep their order after these.
SLOWEST_FILES = ("test_runners.py", "test_range_ends.py", "test_multihost.py", "test_infer_cli.py", "test_training.py",
                 "test_serve.py", "test_serve_ray.py", "test_export.py", "test_serve_risk.py", "test_lte.py",
                 "test_serve_contract.py", "test_readme.py", "test_notebooks.py", "test_ramp_input.py",
                 "test_vision_infer.py")


def pytest_configure(config):
    # pytest-xdist (3.6 on) hands out --dist loadfile's files in order of their number of tests unless
    # told not to: the few-test slow files would start last and leave one worker alone at the end.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))  # stable: order within a file kept


@pytest.fixture(autouse=True)
def restore_logging():
    """The command-line tools reroute the root logger (jaxexit.cli.console); put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


_FIRST_TOKEN_TWINS = weakref.WeakKeyDictionary()


def first_token_twin(model):
    """`model`'s parameters in a model whose every batch takes the first-token exit steps; one per
    model, so that its jitted steps compile (and trace) once, not once per policy run through it."""
    from jaxexit import EarlyExitModel

    twin = _FIRST_TOKEN_TWINS.get(model)
    if twin is None:
        twin = EarlyExitModel(model.config, model.params, model.tokenizer)
        twin.first_token_steps_from = 0
        _FIRST_TOKEN_TWINS[model] = twin
    return twin


def every_live_mode(model, policy, split, batch_size: int, modes: tuple[str, ...] | None = None):
    """`(mode, Exits)` of every live runner on `split`, the first-token exit steps included (in latency
    mode: tests/test_runners.py, on one input length, as each policy kind compiles its own steps).
    `modes`: only these (names as returned; `device-B` for the batch size given)."""
    from jaxexit.exits import runners

    first_token = first_token_twin(model)
    runs = {
        "latency": lambda: runners.run_latency(model, policy, split, warmup=0),
        "latency, host decisions": lambda: runners.run_latency(model, policy, split, warmup=0, pipelined=False),
        "batched": lambda: runners.run_batched(model, policy, split, batch_size=batch_size, warmup=0),
        "device-1": lambda: runners.run_on_device(model, policy, split, batch_size=1, warmup=0),
        f"device-{batch_size}": lambda: runners.run_on_device(model, policy, split, batch_size=batch_size, warmup=0),
        "batched, first-token steps": lambda: runners.run_batched(first_token, policy, split, batch_size=batch_size,
                                                                  warmup=0),
        f"device-{batch_size}, first-token steps":
            lambda: runners.run_on_device(first_token, policy, split, batch_size=batch_size, warmup=0),
    }
    unknown = set(modes or ()) - set(runs)
    if unknown:
        raise ValueError(f"no live mode {sorted(unknown)}; there are {list(runs)}")
    return [(mode, run()) for mode, run in runs.items() if modes is None or mode in modes]
