"""Command-line flags from a config class: one flag (or positional argument) per option, in
one argument group per section."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from prefalign.config.options import _all_sections, _options, command_name, sections
from prefalign.config.values import _unwrap_optional, coerce
from prefalign.errors import ConfigError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_flags(cls: type) -> list[str]:
    """The command-line flags of every option of `cls` (aliases too), as
    add_config_arguments makes them; positional arguments have none."""
    return [flag for f in _options(cls) if not f.metadata.get("positional")
            for flag in (_flag(f.name), *f.metadata.get("aliases", ()))]


class _FlagValue:
    """argparse `type` of a flag: the text converted as a YAML value is (values.coerce), so
    a bad value is refused while parsing, in one line naming the flag, the rule and the
    command's --help. One list item at a time when the flag takes several values."""

    def __init__(self, key: str, tp: Any) -> None:
        self.key, self.tp = key, tp
        base, _ = _unwrap_optional(tp)
        self.__name__ = getattr(typing.get_origin(base) or base, "__name__", "value")

    def __call__(self, text: str) -> Any:
        try:
            return coerce(self.key, text, self.tp)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(
                f"invalid {self.__name__} value: {text!r} ({exc})") from None


def _add_argument(parser: Any, f: dataclasses.Field, tp: Any) -> None:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    meta = f.metadata
    choices = meta.get("choices")
    help_text = f"{meta['help']} (default: {default!r}"
    help_text += f"; one of: {', '.join(map(str, choices))})" if choices else ")"
    help_text = help_text.replace("%", "%%")  # argparse formats help with %(...)s
    base, _ = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    nargs = {"nargs": meta["nargs"]} if meta.get("nargs") is not None else {}
    nargs.update({"action": meta["action"]} if meta.get("action") else {})
    many = bool(nargs)  # several values (nargs, append) arrive one list item at a time
    item_tp = typing.get_args(base)[0] if many and origin is list else tp
    if _unwrap_optional(item_tp)[0] is not str and meta.get("action") in (None, "append"):
        nargs["type"] = _FlagValue(f.name, item_tp)
    if meta.get("positional"):
        parser.add_argument(f.name, default=argparse.SUPPRESS, help=help_text,
                            metavar=meta.get("metavar") or f.name.upper(), **nargs)
        return
    flags = (_flag(f.name), *meta.get("aliases", ()))
    if base is bool:
        parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_text)
        return
    metavar = meta.get("metavar") or ("K=V,..." if origin is dict else
                                      "A,B,..." if origin is list and not many else None)
    parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                        help=help_text, **nargs)


class _NotAnOption(argparse.Action):
    """A hidden flag of another command's option: refused naming this command."""

    def __init__(self, option_strings: list[str], dest: str, command: str = "",
                 **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.command = command

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        parser.error(f"{option_string} is not an option of {self.command}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--kebab-case` flag per dataclass field (or a positional argument), in one
    argument group per section; defaults come from the dataclass.

    A command's config (COMMAND set) also refuses, by name, the flags of options that
    other commands' sections offer (`ppo --eval-data`), rather than as unknown flags.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _options(cls)}
    for title, names in sections(cls).items():
        group = parser.add_argument_group(title) if title else parser
        for name in names:
            _add_argument(group, fields[name], hints[name])
    if not getattr(cls, "COMMAND", ""):
        return
    for name, (_, switch) in sorted(_all_sections().items()):
        if name in fields:
            continue
        flags = [_flag(name)] + ([_flag("no_" + name)] if switch else [])
        flags = [flag for flag in flags if flag not in parser._option_string_actions]
        if flags:
            parser.add_argument(*flags, dest=f"_not_{name}", action=_NotAnOption,
                                command=command_name(cls), default=argparse.SUPPRESS)
