"""Run directories and checkpoints (orbax), written atomically and resumable.

    runs/<run>/
      train_config.json   encoder_config.json   tokenizer/      (written once, at the start)
      metrics.jsonl       training records and every evaluation, one JSON object a line
      layers.csv          the latest per-layer dev table
      checkpoints/<n>/    resumable training state (params, optimiser state, step) + meta.json
      model/              the final parameters, what inference loads
      summary.json        final scores, wall time and the command, once the run is complete
    runs/LATEST           the name of the most recently started run (infer/run.py's default)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxexit.training.parallel import barrier


LATEST = "LATEST"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

log = logging.getLogger(__name__)


class Stopped(Exception):
    """A training run stopped on request (Ctrl-C or SIGTERM) after saving its state at `global_step`:
    `--resume path` continues it exactly."""

    def __init__(self, path: Path, global_step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {global_step}; its state is saved: "
                         f"continue with --resume {path}")
        self.path, self.global_step, self.signal_name = path, global_step, signal_name


class StopRequest:
    """Set by the first SIGINT or SIGTERM while `stop_on_signal` is active (`signal`: its name)."""

    signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def stop_on_signal():
    """While active, the first Ctrl-C or SIGTERM asks the training loop to stop after the step it is
    in (the loop then saves its state and raises `Stopped`) instead of killing the process between
    checkpoints; a second one acts as it would have without this. Off the main thread, where Python
    cannot install handlers, nothing changes."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)

    def handler(signum, frame):
        restore()  # a second signal: the old behaviour (KeyboardInterrupt, or the process ends)
        request.signal = signal.Signals(signum).name
        log.warning("%s: stopping after this step and saving the state (again to stop at once)", request.signal)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        restore()


def write_json(path: Path, obj) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


class RunDir:
    """One fine-tuning run on disk. Only process 0 writes; every process restores. In a
    multi-process run every process calls `save_state`, `restore_state` and `save_model` at the same
    point (orbax writes each array once, from the process holding it; all on a shared file system)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._manager = None

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (process 0). Asked only when needed: a run
        directory is named before a multi-process run joins (`jax.distributed` must come first)."""
        return jax.process_index() == 0

    # ---- creation ----------------------------------------------------------------------------
    @classmethod
    def create(cls, output_dir: str | os.PathLike, name: str, train_config: dict, encoder_config,
               tokenizer) -> "RunDir":
        run = cls(Path(output_dir) / name)
        if run.writer:  # (the others checked the name before a multi-process run joined: it exists by now)
            cls.check_free(output_dir, name)
            run.path.mkdir(parents=True, exist_ok=True)
            write_json(run.path / "train_config.json", train_config)
            write_json(run.path / "encoder_config.json", encoder_config.to_dict())
            tokenizer.save(run.path / "tokenizer")
            write_text(Path(output_dir) / LATEST, name + "\n")
        return run

    @classmethod
    def check_free(cls, output_dir: str | os.PathLike, name: str) -> "RunDir":
        """The run `output_dir/name`, which must not exist yet (or be empty)."""
        run = cls(Path(output_dir) / name)
        if run.path.exists() and any(run.path.iterdir()):
            raise FileExistsError(f"{run.path} already exists: pass --resume {run.path} to continue it, "
                                  "or choose another --run-name")
        return run

    @classmethod
    def latest(cls, output_dir: str | os.PathLike) -> "RunDir":
        marker = Path(output_dir) / LATEST
        if not marker.is_file():
            raise FileNotFoundError(f"no {marker}: run train/finetune.py first, or pass a checkpoint path")
        return cls(Path(output_dir) / marker.read_text().strip())

    # ---- configs and logs ----------------------------------------------------------------------
    def train_config(self) -> dict:
        return read_json(self.path / "train_config.json")

    def encoder_config(self) -> dict:
        """The model's config as saved (`encoder_config.json`); the model class reads it back."""
        return read_json(self.path / "encoder_config.json")

    def log(self, record: dict) -> None:
        if self.writer:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                f.flush()

    def truncate_log(self, global_step: int) -> None:
        """Drop records past `global_step` (written after the checkpoint a resumed run restarts from)."""
        path = self.path / "metrics.jsonl"
        if self.writer and path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("global_step", 0) <= global_step]
            write_text(path, "".join(line + "\n" for line in keep))

    def records(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    # ---- resumable training state ----------------------------------------------------------------
    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                (self.path / "checkpoints").absolute(),
                options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
            )
        return self._manager

    def save_state(self, global_step: int, state, meta: dict) -> None:
        self.manager.save(global_step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def latest_meta(self) -> dict | None:
        step = self.manager.latest_step()
        if step is None:
            return None
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_state(self, abstract_state):
        step = self.manager.latest_step()
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def stop(self, request: StopRequest, global_step: int, state, meta: dict, saved: bool):
        """End a training loop that `request` (`stop_on_signal`) asked to stop: this step's state
        saved (unless the loop just `saved` it) and written out, then `Stopped` raised."""
        if not saved:
            self.save_state(global_step, state, meta)
        self.wait()
        raise Stopped(self.path, global_step, request.signal)

    # ---- the final model -------------------------------------------------------------------------
    def save_model(self, params, summary: dict) -> None:
        """The parameters inference uses (the last step of the last stage), then summary.json."""
        self.wait()
        target = (self.path / "model").absolute()
        if target.exists() and self.writer:
            shutil.rmtree(target)
        barrier("jaxexit-model-cleared")  # no process writes before the old model is gone
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(target, params)
        if self.writer:
            write_json(self.path / "summary.json", summary)

    def export_results(self, results_dir: str | os.PathLike) -> Path:
        """Copy the small, human-readable outputs of a finished run (no parameters) elsewhere."""
        target = Path(results_dir) / self.path.name
        if self.writer:
            target.mkdir(parents=True, exist_ok=True)
            for name in ("summary.json", "layers.csv", "metrics.jsonl", "train_config.json"):
                shutil.copyfile(self.path / name, target / name)
        return target

    def has_model(self) -> bool:
        return (self.path / "model").is_dir() and (self.path / "summary.json").is_file()

    def load_params(self, abstract_params=None):
        if not self.has_model():
            raise FileNotFoundError(f"{self.path} holds no finished model (model/ and summary.json); "
                                    "was the run interrupted? resume it with train/finetune.py --resume")
        target = (self.path / "model").absolute()
        with ocp.StandardCheckpointer() as ckptr:
            if abstract_params is None:
                abstract_params = ckptr.metadata(target).item_metadata.tree
            return ckptr.restore(target, on_one_device(abstract_params))


def on_one_device(abstract):
    """`abstract` (shapes and dtypes) with every leaf that has no sharding of its own on this
    process's first device: parameters saved from several devices, or by several processes, load in
    any process (orbax would otherwise ask for the devices they were saved from)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def place(leaf):
        sharding = getattr(leaf, "sharding", None)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                    sharding=sharding if isinstance(sharding, jax.sharding.Sharding) else device)

    return jax.tree_util.tree_map(place, abstract)


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
