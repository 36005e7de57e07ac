"""Typed configs: dataclasses filled from YAML, then from `--key value` command-line flags.

One source of truth per option: the dataclass field gives its type, default and help, and
from it come the YAML key (`learning_rate`), the flag (`--learning-rate`) and the `--help`
line. Unknown keys, wrong types and values out of range are refused with a message that
names the key and what is valid.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from prefalign.errors import ConfigError


def option(default: Any, help: str, choices: tuple | None = None,
           aliases: tuple[str, ...] = (), **kwargs) -> Any:
    """A config field with its help text (and allowed values), shown by `--help`.

    aliases: further command-line flags for the field (e.g. ("--lr",)), listed in `--help`
    next to the main one; prefixes of flags are never accepted, so a short form must be one.
    """
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta,
                                 **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_mapping(text: str, as_text: bool = False) -> dict[str, Any]:
    """'helpful=0.1,safe=0.5' -> {'helpful': 0.1, 'safe': 0.5} (values kept as text when
    as_text: 'prompt=question' -> {'prompt': 'question'})."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value pairs, got {item!r}")
        if key.strip() in out:
            raise ValueError(f"key {key.strip()!r} is given twice")
        out[key.strip()] = value.strip() if as_text else _to_float(value)
    return out


def _to_int(value: Any) -> int:
    """An int from an int, a whole float or their text ("1e3": YAML 1.1 reads it as text)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("expected an integer")
    if isinstance(value, float) and not value.is_integer():  # also nan and inf
        raise ValueError("expected an integer")
    return int(value)


def _to_float(value: Any) -> float:
    """A finite float from a number or its text: a nan or inf option is always a typo or a
    bug upstream, and it would surface steps later as a NaN loss."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be empty")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError("expected true or false")
        if base is int:
            return _to_int(value)
        if base is float:
            return _to_float(value)
        if base is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError("expected a string")
            return str(value)
        if origin is list:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError("expected a list")
            (item_tp,) = typing.get_args(base)
            return [coerce(key, v.strip() if isinstance(v, str) else v, item_tp) for v in items if v != ""]
        if origin is dict:
            as_text = typing.get_args(base)[1:] == (str,)
            mapping = _parse_mapping(value, as_text) if isinstance(value, str) else value
            if not isinstance(mapping, dict):
                raise ValueError("expected a mapping like a=0.1,b=0.5")
            convert = str if as_text else _to_float
            return {str(k): convert(v) for k, v in mapping.items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key '{key}': {exc} (got {value!r})") from None
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


def _options(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are options: set in __init__ and documented by `option`."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("help") is not None]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_flags(cls: type) -> list[str]:
    """The command-line flags of every option of `cls` (aliases too), as
    add_config_arguments makes them."""
    return [flag for f in _options(cls) for flag in (_flag(f.name), *f.metadata.get("aliases", ()))]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--kebab-case` flag per dataclass field; defaults come from the dataclass."""
    hints = typing.get_type_hints(cls)
    for f in _options(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        help_text = f"{f.metadata['help']} (default: {default!r}"
        help_text += f"; one of: {', '.join(map(str, choices))})" if choices else ")"
        flags = (_flag(f.name), *f.metadata.get("aliases", ()))
        base, _ = _unwrap_optional(hints[f.name])
        if base is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            origin = typing.get_origin(base)
            metavar = "K=V,..." if origin is dict else "A,B,..." if origin is list else None
            parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                                help=help_text)


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what a config never needs and only hides mistakes:
    aliases (`*name`: nested ones expand exponentially, so a few hundred bytes of
    "billion laughs" take gigabytes) and a key given twice in one mapping (the last would
    silently win)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} found; config files may not use anchors "
                "and aliases: write each value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key fails below as usual
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {seen[key]}); "
                        "remove one", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        loader = _ConfigLoader(path.read_text(encoding="utf-8"))
        try:
            data = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def build_config(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Instantiate `cls` from a flat mapping; unknown keys and bad types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        hints_text = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints_text.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{source}: unknown key {', '.join(hints_text)}; "
                          f"run with --help to see the valid keys")
    kwargs = {k: coerce(k, v, hints[k]) for k, v in values.items()}
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and f.name in kwargs and kwargs[f.name] not in choices:
            raise ConfigError(f"config key '{f.name}': {kwargs[f.name]!r} is not one of "
                              f"{', '.join(map(str, choices))}")
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """YAML from `--config` (if given), then every flag the user actually passed."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(load_yaml(config_path))
    known = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in known})
    return build_config(cls, values, source=str(config_path) if config_path else "config")


def config_to_dict(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def require(condition: bool, key: str, message: str) -> None:
    """Range checks in `validate()`: `require(beta > 0, 'beta', 'must be > 0')`."""
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")
