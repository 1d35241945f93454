"""What the typed training configs share: a field with its one-line help text and choices, kept
beside its default (jaxexit/cli/flags.py turns the fields into command-line flags)."""

from __future__ import annotations

import dataclasses


def config_field(default, help: str, choices: tuple | None = None):
    """A config field with its one-line `--help` text (and choices)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})
