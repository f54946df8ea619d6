"""Command-line flags generated from config dataclasses, so that a default and a help text exist once.

A config field declared with :func:`option` carries its flag's help (and, where the field name is not the
flag's, the flag's spelling, choices and deprecated aliases) in ``dataclasses.field``
metadata. :func:`add_options` turns a dataclass's fields into argparse arguments (types from the
annotations: ``bool`` -> ``--x/--no-x``, ``Optional[T]`` -> ``T`` or unset, ``tuple[int, ...]`` -> a
comma-separated list); :func:`options_from_args` reads them back into the dataclass. A flag therefore
cannot be parsed and then ignored, and ``--help`` shows the dataclass's own default (the same idea as
Megatron-LM's argument utilities generating flags from its ``TransformerConfig``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Optional


def option(default: Any = dataclasses.MISSING, *, help: str, flag: Optional[str] = None,
           choices: Optional[tuple] = None, deprecated: tuple[str, ...] = (),
           default_factory: Any = dataclasses.MISSING, cli: bool = True,
           algos: Optional[tuple[str, ...]] = None) -> Any:
    """A dataclass field with its command-line flag.

    Args:
        default / default_factory: as ``dataclasses.field``.
        help: the flag's help text (shown by ``--help`` with the default).
        flag: the flag's spelling when it is not ``--field-name``.
        choices: allowed values.
        deprecated: old spellings still accepted (hidden from ``--help``).
        cli: False for a field that has no flag (set by code, e.g. a derived value).
        algos: the RL algorithms whose command offers the flag (None: every command that takes the config).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "deprecated": deprecated, "cli": cli,
            "algos": algos}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(T, optional) for ``T`` or ``Optional[T]``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a flag."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def add_options(group: argparse._ActionsContainer, cls: type, *, only: Optional[tuple[str, ...]] = None,
                exclude: tuple[str, ...] = (), defaults: Optional[dict[str, Any]] = None,
                required: tuple[str, ...] = (), algo: Optional[str] = None) -> None:
    """Add a flag for each :func:`option` field of ``cls`` (``only`` / ``exclude`` select by field name;
    ``defaults`` overrides a field's default for this command; ``required`` fields have no default;
    ``algo`` drops fields offered to other algorithms only)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in cli_fields(cls):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        if algo is not None and f.metadata.get("algos") and algo not in f.metadata["algos"]:
            continue
        typ, _ = _base_type(hints[f.name])
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if typ is not bool and not f.metadata.get("choices"):  # named after the flag, not the field
            kw["metavar"] = _flag(f).lstrip("-").replace("-", "_").upper()
        if f.name in required:
            kw["required"] = True
        else:
            kw["default"] = default
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(typ) is tuple:
            kw["type"] = _int_tuple
            kw["default"] = ",".join(str(x) for x in default) if default is not None and "default" in kw else kw.get("default")
        else:
            kw["type"] = typ
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        group.add_argument(_flag(f), **kw)
        for old in f.metadata.get("deprecated", ()):
            group.add_argument(old, dest=f.name, type=kw.get("type"), action=kw.get("action"),
                               help=argparse.SUPPRESS, **({"choices": kw["choices"]} if "choices" in kw else {}))


def options_from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` built from the parsed flags of its :func:`option` fields (absent ones keep the dataclass
    default) plus ``given`` (nested configs, fields without flags). The values' ranges are checked before, for
    every command, by :func:`megatron_qrm.arguments.check_numeric_flags`."""
    values = dict(given)
    for f in cli_fields(cls):
        if f.name in values or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if isinstance(value, str) and typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple:
            value = _int_tuple(value)
        values[f.name] = value
    return cls(**values)
