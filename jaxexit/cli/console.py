"""What the command-line tools print, and where the rest of the logging goes.

The console shows progress bars, the per-layer tables, jaxexit's own few messages, and every
warning and error. Libraries' INFO chatter (orbax logs ~90 lines per checkpoint, jax its backend
probing) goes only to a log file in the run directory, `train.log`, once that directory is known;
records logged before then are kept in memory and written to it first.

A user error (a missing file, an unreachable model, a flag out of range) ends the command with one
line, `error: <what>`, and exit status 2 (`user_errors`); its traceback goes to the log file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import sys
from pathlib import Path

LOG_FILE = "train.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Exceptions that mean the user asked for something that cannot be done (as opposed to a bug).
USER_ERRORS = (ValueError, OSError, ImportError)

_state: dict = {"buffer": None, "file": None}


class _ConsoleFilter(logging.Filter):
    """jaxexit's INFO and above, everyone's WARNING and above; never records marked file-only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        return record.levelno >= logging.WARNING or (record.name.startswith("jaxexit") and record.levelno >= logging.INFO)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup(keep_for_file: bool = True) -> None:
    """Route logging for a command-line run: the console as above; with `keep_for_file`, every
    INFO record is also kept until `log_to_file` names the file (train/finetune.py)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(_ConsoleFormatter())
    root.addHandler(console)
    _state["buffer"] = _state["file"] = None
    if keep_for_file:
        buffer = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        root.addHandler(buffer)
        _state["buffer"] = buffer
    logging.captureWarnings(True)
    # absl (orbax logs through it) would otherwise warn that flags were not parsed.
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.use_python_logging(quiet=True)


def log_to_file(run_dir: str | Path) -> Path | None:
    """Write every INFO record (kept ones first) to `run_dir/train.log` from now on. Does nothing
    unless `setup` asked for it, so library use of the trainer leaves logging alone."""
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


def fail(message: str, exc: BaseException | None = None) -> None:
    """End a command after a user error: `error: <message>` on one line, exit status 2; the
    traceback goes to the log file when there is one."""
    if exc is not None:
        logging.getLogger("jaxexit").info("the error's traceback", exc_info=exc, extra={"console": False})
    first = " ".join(str(message).split("\n")[0].split()) or type(exc).__name__
    print(f"error: {first}", file=sys.stderr)
    raise SystemExit(2)


def stopped(exc: BaseException) -> None:
    """End a command whose run stopped on Ctrl-C or SIGTERM after saving (`checkpoint.Stopped`):
    the message on one line, exit status 130 (the shell's for an interrupted command)."""
    print(f"stopped: {exc}", file=sys.stderr)
    raise SystemExit(130)


class Parser(argparse.ArgumentParser):
    """argparse with its errors (unknown flag, wrong type, bad choice) as one `error:` line."""

    def error(self, message: str):
        fail(f"{message} (see {self.prog} --help)")
