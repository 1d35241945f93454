"""What the command-line tools print, and where the rest of the logging goes.

The console shows progress bars, the per-layer tables, jaxexit's own few messages, and every
warning and error. Libraries' INFO chatter (orbax's at every checkpoint, jax's backend probing) goes
only to a log file in the run directory, `train.log`, once that directory is known; records logged
before then are kept in memory and written to it first (jaxexit/training/logs.py, which the
trainers call).

A user error (a missing file, an unreachable model, a flag out of range) ends the command with one
line, `error: <what>`, and exit status 2 (`user_errors`); its traceback goes to the log file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from jaxexit.training import logs
from jaxexit.training.checkpoint import Stopped

# Exceptions that mean the user asked for something that cannot be done (as opposed to a bug).
USER_ERRORS = (ValueError, OSError, ImportError)


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
    INFO record is also kept until the trainer names the file (`logs.log_to_file`)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(_ConsoleFormatter())
    root.addHandler(console)
    logs.capture(keep_for_file)
    logging.captureWarnings(True)
    # absl (orbax logs through it) would otherwise warn that flags were not parsed.
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.use_python_logging(quiet=True)


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


def train(job):
    """`job()` for a training command (building its config included, so that a bad flag value is a
    user error too): a stop (`checkpoint.Stopped`) ends it with status 130, a user error with
    status 2 (`stopped`, `fail`)."""
    try:
        return job()
    except Stopped as e:
        stopped(e)
    except USER_ERRORS as e:
        fail(str(e), e)


def report_run(run, results_dir: str | None) -> None:
    """Where a finished run is (and its log), and where its results were copied (`--results-dir`)."""
    print(f"run directory: {run.path} (log: {run.path / logs.LOG_FILE})")
    if results_dir:
        print(f"results copied to {run.export_results(results_dir)}")


class Parser(argparse.ArgumentParser):
    """argparse with its errors (unknown flag, wrong type, bad choice) as one `error:` line."""

    def error(self, message: str):
        fail(f"{message} (see {self.prog} --help)")
