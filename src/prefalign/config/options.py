"""Options and sections: the dataclass fields a config is made of, and their titles."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from prefalign.errors import ConfigError


def option(default: Any, help: str, choices: tuple | None = None,
           aliases: tuple[str, ...] = (), *, positional: bool = False, nargs: Any = None,
           metavar: str | None = None, action: str | None = None, **kwargs) -> Any:
    """A config field with its help text (and allowed values), shown by `--help`.

    aliases: further command-line flags for the field (e.g. ("--lr",)), listed in `--help`
    next to the main one; prefixes of flags are never accepted, so a short form must be one.
    positional: a command-line argument without a flag (`data check FILE`); nargs and
    metavar are argparse's (nargs="+": one or more values, read as the field's list);
    action="append": a list option whose flag may be repeated, one item each (text with
    commas stays one item).
    """
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases),
            "positional": positional, "nargs": nargs, "metavar": metavar, "action": action}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta,
                                 **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def option_like(cls: type, name: str, default: Any, help: str | None = None) -> Any:
    """The option `name` of `cls` (a section) with another default (and help): a command
    whose default differs (SFT's learning rate) redeclares the field with this, so its
    flag, aliases, choices and section stay those of the one declaration."""
    meta = cls.__dataclass_fields__[name].metadata
    return option(default, help or meta["help"], meta.get("choices"), meta.get("aliases", ()),
                  positional=meta.get("positional", False), nargs=meta.get("nargs"),
                  metavar=meta.get("metavar"), action=meta.get("action"))


class Section:
    """The base of config sections: frozen dataclasses of option(...) fields with a title.

    A command's config composes the sections it uses by inheritance, so its options stay
    flat attributes (`config.learning_rate`) and an option it does not use is not offered:

        @dataclass(frozen=True)
        class OptimOptions(Section):
            SECTION = "optim"
            learning_rate: float = option(1e-5, "peak learning rate")

        @dataclass(frozen=True)
        class DPOConfig(ModelOptions, OptimOptions, DPOOptions):
            COMMAND = "dpo"

    SECTION titles the section's group in `--help` and its mapping in YAML (`optim:
    {learning_rate: 1e-4}`; flat keys work too). A field belongs to the section of the
    class that declares it first; a command may redeclare it for another default
    (option_like) without moving it. COMMAND names the command in the refusal of another
    command's option ("'eval_data' is not an option of ppo"), by flag or by YAML key.

    validate(): each section checks its own fields, then calls super().validate(); this
    one ends the chain (passing it on to a class after it in the MRO that has one), so a
    composed config runs every section's checks; checks across sections go in the
    command's config.
    """

    SECTION: ClassVar[str] = ""
    COMMAND: ClassVar[str] = ""

    def validate(self) -> None:
        parent = getattr(super(), "validate", None)
        if parent is not None:
            parent()


def _options(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are options: set in __init__ and documented by `option`."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("help") is not None]


def _title(klass: type) -> str:
    """The section of the fields `klass` declares: its own SECTION, else that of its one
    base (a section extending another, as DataOptions does); a command's config composed
    of several bases declares new fields outside any section unless it sets one."""
    if "SECTION" in vars(klass):
        return klass.SECTION or ""
    bases = [b for b in klass.__bases__ if b is not object]
    return _title(bases[0]) if len(bases) == 1 else ""


def sections(cls: type) -> dict[str, list[str]]:
    """Section title -> the names of its options in `cls`: sections in the order of the
    bases (a section listed first comes first), options in the dataclass's field order (a
    base's before a subclass's, the last of several bases' first); "" holds options
    outside any section."""
    names = {f.name for f in _options(cls)}
    owner: dict[str, tuple[int, str]] = {}
    mro = [k for k in cls.__mro__ if dataclasses.is_dataclass(k)]
    for rank, klass in reversed(list(enumerate(mro))):  # the first declaration wins
        for name in vars(klass).get("__annotations__", {}):
            if name in names and name not in owner:
                owner[name] = (rank, _title(klass))
    first: dict[str, int] = {}
    for rank, title in owner.values():
        first[title] = min(rank, first.get(title, rank))
    grouped: dict[str, list[str]] = {title: [] for title in sorted(first, key=first.get)}
    for f in _options(cls):
        grouped[owner[f.name][1]].append(f.name)
    return grouped


def _all_sections() -> dict[str, tuple[str, bool]]:
    """Option name -> (section title, is a switch) over every section class defined so far
    (those of the commands whose modules are imported), to tell another command's option
    from a typo."""
    seen, todo, found = set(), list(Section.__subclasses__()), {}
    while todo:
        klass = todo.pop()
        if klass in seen:
            continue
        seen.add(klass)
        todo += klass.__subclasses__()
        if dataclasses.is_dataclass(klass):
            fields = {f.name: f for f in _options(klass)}
            for title, names in sections(klass).items():
                found.update({name: (title, fields[name].type in (bool, "bool"))
                              for name in names if title})
    return found


def command_name(cls: type) -> str:
    """What a refusal calls the command of `cls`: its COMMAND, else the class name."""
    return getattr(cls, "COMMAND", "") or cls.__name__


def require(condition: bool, key: str, message: str) -> None:
    """Range checks in `validate()`: `require(beta > 0, 'beta', 'must be > 0')`."""
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")
