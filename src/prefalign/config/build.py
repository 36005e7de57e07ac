"""Configs from YAML and flags: flat keys and section mappings, unknown keys refused naming
the closest valid one (or the command, for another command's option); back to flat YAML."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from prefalign.config.options import _all_sections, command_name, sections
from prefalign.config.values import coerce, load_yaml
from prefalign.errors import ConfigError


def _unknown(cls: type, key: str, title: str | None) -> str:
    """Why `key` (in section `title`, or at the top level when None) is not an option of
    `cls`: another command's option, an option of another section, or a typo of one."""
    import difflib

    grouped = sections(cls)
    known = [name for names in grouped.values() for name in names]
    owner = next((t for t, names in grouped.items() if key in names), None)
    if owner is not None:  # only reached for a key inside a section's mapping
        where = f"section '{owner}'" if owner else "the top level"
        return f"'{key}' is an option of {where}, not of section '{title}'"
    if key in _all_sections():
        return f"'{key}' is not an option of {command_name(cls)}"
    if title is None and key in {t for t, _ in _all_sections().values()}:
        return f"'{key}' is not a section of {command_name(cls)}"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = [name for name in known
               if f"--{key.replace('_', '-')}" in fields[name].metadata.get("aliases", ())]
    pool = grouped.get(title, []) if title is not None else [*known, *filter(None, grouped)]
    close = (aliases or difflib.get_close_matches(key, pool, n=1)
             or difflib.get_close_matches(key, known, n=1))
    name = f"{title}.{key}" if title else key
    return f"unknown key '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")


def flat_values(cls: type, values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """`values` with each section mapping (`optim: {learning_rate: 1e-4}`) replaced by its
    keys; a key given both ways, or one `cls` does not offer, is a ConfigError naming it
    (and the closest valid key, or the command, when it is another command's option)."""
    grouped = sections(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    flat: dict[str, Any] = {}
    problems: list[str] = []

    def put(key: str, value: Any) -> None:
        if key in flat:
            problems.append(f"'{key}' is given twice (at the top level and in its section)")
        flat[key] = value

    for key, value in values.items():
        if key in grouped and key and isinstance(value, dict):
            for inner, inner_value in value.items():
                if inner in grouped[key]:
                    put(inner, inner_value)
                else:
                    problems.append(_unknown(cls, str(inner), key))
        elif key in known:
            put(key, value)
        elif key in grouped and key:
            problems.append(f"'{key}' is a section: give it a mapping of its options")
        else:
            problems.append(_unknown(cls, str(key), None))
    if problems:
        raise ConfigError(f"{source}: {'; '.join(problems)}; run with --help to see the "
                          "valid keys")
    return flat


def build_config(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Instantiate `cls` from a mapping of flat keys and/or section mappings, then run its
    validate(); unknown keys and bad types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    values = flat_values(cls, values, source)
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
    source = str(config_path) if config_path else "config"
    if config_path:
        values.update(flat_values(cls, load_yaml(config_path), source))
    known = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in known})
    return build_config(cls, values, source=source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Every option as a flat key, section by section (what config.yaml holds)."""
    names = [name for group in sections(type(config)).values() for name in group]
    names += [f.name for f in dataclasses.fields(config) if f.init and f.name not in names]
    return {name: getattr(config, name) for name in names}


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
