"""What the typed configs share: `replace` / `to_dict` / a strict `from_dict` (`DictConfig`), and a
field with its one-line help text and choices kept beside its default (`config_field`;
jaxexit/cli/flags.py turns such fields into command-line flags)."""

from __future__ import annotations

import dataclasses
from typing import Any


class DictConfig:
    """`replace`, `to_dict` and a strict `from_dict` for the frozen config dataclasses."""

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of `to_dict`; unknown keys are an error (a file from another version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**d)


def config_field(default, help: str, choices: tuple | None = None):
    """A config field with its one-line `--help` text (and choices)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})
