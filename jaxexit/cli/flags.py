"""Command-line flags made from a typed config dataclass (jaxexit/text/train_config.py,
jaxexit/vision/config.py): one `--field-name VALUE` per field, typed from its annotation, with the
help and choices the field carries (`jaxexit.training.configs.config_field`). Every default is
None, "not given", so a preset plus the given flags is the config."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing


def parser_type(annotation) -> tuple[type, bool]:
    """(scalar type, accepts 'none') for a field annotation like `int | None`."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    scalar = [h for h in hints if h is not type(None)]
    return scalar[0], len(scalar) < len(hints)


def converter(kind: type, optional: bool, choices: tuple | None = None):
    """argparse's `type=`: text -> `kind` (or None for 'none' when `optional`), within `choices`."""
    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}{' or none' if optional else ''}, got {text!r}")
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value
    convert.__name__ = kind.__name__
    return convert


def add_field_arguments(parser: argparse.ArgumentParser, config_class, skip: str) -> None:
    """One `--field-name VALUE` per field of `config_class` but `skip` (the one a preset sets),
    typed, with its help and choices; boolean fields are switches (`--skip-bad-rows` /
    `--no-skip-bad-rows`)."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name == skip:
            continue
        kind, optional = parser_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata["help"].replace("%", "%%")  # argparse %-formats help
        if kind is bool:
            parser.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
            continue
        choices = field.metadata["choices"]
        shown = f"{{{','.join(choices)}}}" if choices else kind.__name__.upper()
        parser.add_argument(flag, dest=field.name, default=None, type=converter(kind, optional, choices),
                            metavar=shown, help=help_text if field.default is None else
                            f"{help_text} (preset: {field.default})")


def given_fields(args: argparse.Namespace, config_class, skip: str) -> dict:
    """The fields of `config_class` (but `skip`) given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if f.name != skip and getattr(args, f.name, None) is not None}


def with_flags(base, args: argparse.Namespace, skip: str):
    """`base` (a preset) with the flags' overrides; a value out of range is a ValueError naming its flag."""
    try:
        return base.replace(**given_fields(args, type(base), skip))
    except ValueError as e:
        raise ValueError(flag_names(str(e), type(base))) from None


def flag_names(message: str, config_class) -> str:
    """`message` with each field name of `config_class` written as its command-line flag."""
    for f in dataclasses.fields(config_class):
        message = re.sub(rf"\b{f.name}\b", "--" + f.name.replace("_", "-"), message)
    return message
