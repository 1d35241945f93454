"""Where a training run's log records go: `train.log` in its run directory, once that is known.

The command-line tools (jaxexit/cli/console.py) ask for it with `capture(True)`: every INFO record
is kept in memory until the run directory exists, then written to its `train.log` first. Without
that request `log_to_file` does nothing, so library use of the trainers leaves logging alone.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

LOG_FILE = "train.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_state: dict = {"buffer": None, "file": None}


def capture(keep: bool) -> None:
    """Forget any earlier file (its handler is gone with the root's); with `keep`, hold every record
    from now on until `log_to_file` names the file."""
    _state["buffer"] = _state["file"] = None
    if keep:
        buffer = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        logging.getLogger().addHandler(buffer)
        _state["buffer"] = buffer


def log_to_file(run_dir: str | Path) -> Path | None:
    """Write every INFO record (kept ones first) to `run_dir/train.log` from now on; None unless
    `capture(True)` asked for it."""
    buffer = _state["buffer"]
    if buffer is None and _state["file"] is None:
        return None
    root = logging.getLogger()
    if _state["file"] is not None:  # a second run in the same process
        root.removeHandler(_state["file"])
        _state["file"].close()
    path = Path(run_dir) / LOG_FILE
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    if buffer is not None:
        for record in buffer.buffer:
            handler.handle(record)
        root.removeHandler(buffer)
        buffer.close()
        _state["buffer"] = None
    root.addHandler(handler)
    _state["file"] = handler
    return path
