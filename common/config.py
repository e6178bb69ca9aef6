"""Typed configs: one dataclass per stage, parsed from the command line or a dict.

Each stage (prep, pipeline, train) declares its settings as a frozen dataclass whose
fields carry their help text in ``metadata["help"]``; validation lives in the
dataclass's ``__post_init__`` and raises ``ValueError`` with one readable line.
This module turns such a dataclass into an argparse parser (one ``--flag`` per
field, unknown flags rejected) and back, so there is one source of truth per stage
and no 48-parameter functions.

    @dataclass(frozen=True)
    class PrepConfig:
        workers: int = field(default=2, metadata={"help": "processes"})
        def __post_init__(self):
            check_at_least(self, ["workers"])     # "--workers must be an integer >= 1, got 0"

    cfg = parse_args(PrepConfig, sys.argv[1:], prog="build_records.py")
"""
from __future__ import annotations

import argparse
import dataclasses
import numbers
import types
import typing
from typing import Any, Sequence, TypeVar

from common.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message is one line meant for the user."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def at_least(name: str, value: Any, minimum: int = 1) -> None:
    """The one integer-range check: ``value`` is an integer (not a bool) >= ``minimum``, or
    ConfigError "NAME must be an integer >= MIN, got VALUE". ``name`` is what the user typed:
    a flag ("--batch-size") or a keyword argument ("batch_size")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_at_least(cfg: Any, names: Sequence[str], minimum: int = 1) -> None:
    """``at_least`` on each named field of a config, named as its flag; a None field (meaning
    "the default" or "no limit") is skipped."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None:
            at_least(_flag(name), value, minimum)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(tp: Any, optional: bool):
    """A function str -> value for argparse; 'none' means None for optional fields."""
    def convert(text: str):
        if optional and text.lower() in ("none", ""):
            return None
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        if tp in (int, float, str):
            return tp(text)
        raise TypeError(f"unsupported config field type {tp!r}")
    convert.__name__ = getattr(tp, "__name__", "value")
    return convert


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default once, after its help; none where the help already says its
    default, where it is None, or for a switch that is off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: {'on' if action.default is True else '%(default)s'})"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        # "-b, --batch-size N" rather than "-b N, --batch-size N"
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``PROG: error: WHAT (PROG --help lists the flags)``, exit 2,
    instead of the usage block before it (the project's rule for bad input: one line)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")


def build_parser(cls: type, prog: str | None = None, description: str | None = None,
                 groups: dict[str, Sequence[str]] | None = None,
                 aliases: dict[str, Sequence[str]] | None = None,
                 metavars: dict[str, str] | None = None, usage: str | None = None) -> Parser:
    """An ArgumentParser with one flag per dataclass field (``a_b`` -> ``--a-b``).

    A bool field that is off by default is a switch ``--x`` (nothing to negate); one that
    is on by default is ``--x`` / ``--no-x``. Tuple/list fields are not supported on
    purpose: stages take comma-separated strings and validate them. ``groups`` sorts the
    flags under headings in --help ({title: field names}; fields not named go last under
    "other"); ``aliases`` adds option strings ({"batch_size": ["-b"]}); ``metavars`` names
    values in --help ({"records": "DIR"}; an int is N unless named). A field whose metadata
    holds ``positional=True`` is an operand (``prog RECORDS``) instead of a flag.
    """
    parser = Parser(prog=prog, description=description, allow_abbrev=False,
                    formatter_class=HelpFormatter, usage=usage)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    groups = dict(groups or {})
    unknown = [name for names in groups.values() for name in names if name not in fields]
    if unknown:
        raise TypeError(f"help groups name no field of {cls.__name__}: {', '.join(unknown)}")
    grouped = {name for names in groups.values() for name in names}
    rest = [name for name in fields if name not in grouped]
    if groups and rest:
        groups["other"] = rest
    layout = [(parser.add_argument_group(title), names) for title, names in groups.items()] or [(parser, rest)]
    for container, names in layout:
        for name in names:
            _add_field(container, fields[name], hints[name], (aliases or {}).get(name, ()),
                       (metavars or {}).get(name))
    return parser


def _add_field(container, f: dataclasses.Field, hint: Any, aliases: Sequence[str], metavar: str | None) -> None:
    tp, optional = _unwrap_optional(hint)
    flags = [a for a in aliases if not a.startswith("--")] + [_flag(f.name)] + [a for a in aliases if a.startswith("--")]
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.metadata.get("positional"):      # a required operand (a folder to check), not a --flag
        container.add_argument(f.name, help=help_text, type=_converter(tp, optional), metavar=metavar)
    elif tp is bool and not optional and not default:
        container.add_argument(*flags, dest=f.name, default=default, help=help_text, action="store_true")
    elif tp is bool and not optional:
        action = container.add_argument(*flags, dest=f.name, default=default, help=help_text,
                                        action=argparse.BooleanOptionalAction)
        action.help = help_text           # some Pythons append their own "(default: ...)"
    else:
        container.add_argument(*flags, dest=f.name, default=default, help=help_text,
                               type=_converter(tp, optional), choices=f.metadata.get("choices"),
                               metavar=metavar or f.metadata.get("metavar")
                               or ("N" if tp is int and not f.metadata.get("choices") else None))


def parse_args(cls: type[T], argv: Sequence[str] | None, prog: str | None = None,
               description: str | None = None) -> T:
    """Parse argv into ``cls``; bad values exit with status 2 and one line from argparse."""
    parser = build_parser(cls, prog=prog, description=description)
    ns = parser.parse_args(argv)
    try:
        return cls(**vars(ns))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a dict (a saved config); unknown keys are an error, not ignored."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) for {cls.__name__}: {', '.join(unknown)}")
    return cls(**data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-ready dict (field order kept)."""
    return dataclasses.asdict(cfg)
