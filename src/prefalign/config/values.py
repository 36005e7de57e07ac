"""Config values from text: YAML files, and command-line or YAML values converted to a
field's type (ConfigError naming the key otherwise)."""

from __future__ import annotations

import contextlib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from prefalign.errors import ConfigError


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
