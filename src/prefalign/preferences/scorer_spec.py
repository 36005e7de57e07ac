"""Scorer specs: one string that names a scorer or a weighted sum of them.

`load_scorer(spec)` builds the Scorer (preferences.scorers) a spec describes:

    SPEC    := TERM ("," TERM)*
    TERM    := SCORER [":" WEIGHT]
    SCORER  := NAME ["(" key=value, ... ")"]            a built-in (preferences.scorers)
             | module.path:attr ["(" key=value, ... ")"] a function or Scorer subclass
             | path/to/file.py:attr ["(" ... ")"]       the same, from a file
             | DIRECTORY ["(" key=value, ... ")"]       a reward model (holds config.json)

    length(max=200)
    length(min=10,max=200):0.2,json_valid:1          0.2 * length + 1.0 * json_valid
    regex(pattern='^\\{'):1,python_compiles:2
    runs/rm/final:1,regex(pattern=TODO):-0.5         a reward model with a penalty

Several terms, or one weighted term, score the plain weighted sum sum_i w_i * s_i, not an
average: weights mean what they say and adding a term never rescales the others (make the
weights sum to 1 for a mean). A term without a weight counts 1; negative weights penalise.

A trailing ":NUMBER" is always a weight (no Python name starts with a digit, so
module:function stays unambiguous). A value that starts with ' or " runs to the matching
quote (no escapes inside); quote a value holding a comma or an unbalanced parenthesis,
e.g. regex(pattern='^\\d{1,3}$'). A term (or whole spec) naming an existing directory is
a reward model, whatever characters its path holds. A reward model's own Python code
(`trust_remote_code`) cannot be enabled in a spec: that takes a command's explicit flag.

The built-ins are listed in preferences.scorers.

Import paths name a function, a Scorer instance or a Scorer subclass (built with the
parameters). `module.path:attr` is imported with the working directory searched first
(as `python -m` does), then the Python path; `path/to/file.py:attr` (relative to the
working directory, or absolute) imports that file, with its own directory searched first
for its imports. Either way the module's code runs, like a script: name only code you trust.

A function scores one pair, fn(prompt, response, **params) -> number, unless it has the
attribute `batched = True` (the @batched decorator sets it): then it scores a batch,
fn(prompts, responses, **params) -> numbers. The attribute decides, never a trial call: a
per-item function handed lists can return a plausible number. A function with a parameter
named `completions` is in TRL's form (GRPOTrainer's reward functions),
fn(prompts, completions, **kwargs) -> list of numbers, called by keyword once per batch with
the prompt rows' other columns as keyword arguments (one list per column; none when the
caller has no rows, as in evaluate); a None in the list (TRL's "no reward") is an error.
Unquoted parameter values of import paths and reward models become int, float, bool
(true/false) or None (none) when they read as one; quoted values stay strings. True and
False score 1.0 and 0.0.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from prefalign.errors import ConfigError
from prefalign.preferences.scorers import (
    BUILTINS,
    FunctionScorer,
    RewardModelScorer,
    Scorer,
    WeightedSum,
    describe_value,
    is_trl_reward_function,
)

SCORER_HELP = (
    "what scores a response: a built-in NAME(key=value,...), module.path:function or "
    "path/to/file.py:function (code that runs; TRL's f(prompts, completions, **kwargs) works "
    "too), or a reward-model directory; join terms with ',' and weight them with ':W' for a weighted "
    "sum, e.g. \"length(min=10,max=200):0.2,json_valid:1\". Built-ins: "
    + "; ".join(usage for _, _, usage in BUILTINS.values()) + "."
)


class _Quoted(str):
    """A parameter value written in quotes: always a string, never converted."""


@dataclass
class Term:
    """One term of a spec: `text` as written without its weight (it names the scorer)."""

    text: str
    target: str  # a built-in name, module:attr or a directory
    params: dict[str, str]
    weight: float | None


_WEIGHT = re.compile(r":\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def load_scorer(spec: str | Scorer | Callable, **options: Any) -> Scorer:
    """Build the scorer a spec describes (see the module docstring).

    `options` are parameters of a single-term spec, given as Python values (for example a
    tokenizer for a reward model); a Scorer is returned as is and a plain callable is wrapped.
    """
    if isinstance(spec, Scorer):
        if options:
            raise ConfigError(f"scorer {spec.name}: a ready Scorer takes no options")
        return spec
    if callable(spec):
        return FunctionScorer(spec, options)
    if not isinstance(spec, str):
        raise ConfigError(f"a scorer spec is a string, got {type(spec).__name__}")
    terms = parse_spec(spec)
    if len(terms) == 1 and terms[0].weight is None:
        return _build(terms[0], options)
    if options:
        raise ConfigError(f"scorer {spec!r} combines terms; write parameters into the spec as "
                          "name(key=value) instead of passing options")
    return WeightedSum([(_build(t, {}), 1.0 if t.weight is None else t.weight) for t in terms])


def parse_spec(spec: str) -> list[Term]:
    """Split a spec into terms; raises ConfigError naming the spec for bad syntax."""
    text = spec.strip()
    if _is_dir(text):  # a directory path may hold ',', ':' or '('
        return [Term(text, text, {}, None)]
    if not text:
        raise ConfigError(f"empty scorer spec; use one of {', '.join(BUILTINS)}, "
                          "module.path:function or a reward-model directory")
    return [_parse_term(part.strip(), spec) for part in _split(text, spec, quote_depth=1)]


def _split(text: str, spec: str, quote_depth: int) -> list[str]:
    """Split at commas outside parentheses and quotes; a quote opens only a value (after =)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"" and depth >= quote_depth and text[:i].rstrip().endswith("="):
            quote = ch
        elif ch in "()":
            depth += 1 if ch == "(" else -1
            if depth < 0:
                raise ConfigError(f"scorer spec {spec!r}: ')' without '('")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quote or depth:
        raise ConfigError(f"scorer spec {spec!r}: unclosed {quote or '('}")
    return parts + [text[start:]]


def _parse_term(text: str, spec: str) -> Term:
    if not text:
        raise ConfigError(f"scorer spec {spec!r} has an empty term")
    weight, match = None, _WEIGHT.search(text)
    if match and text[: match.start()].strip() and not _is_dir(text):
        weight = float(match.group(1))
        if not math.isfinite(weight):
            raise ConfigError(f"scorer spec {spec!r}: weight {match.group(1)} is not finite")
        text = text[: match.start()].strip()
    if _is_dir(text) or "(" not in text:
        return Term(text, text, {}, weight)
    if not text.endswith(")"):
        raise ConfigError(f"scorer spec {spec!r}: {text!r} must end with ')'")
    target = text[: text.index("(")].strip()
    params: dict[str, str] = {}
    for item in _split(text[text.index("(") + 1 : -1], spec, quote_depth=0):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key.isidentifier():
            raise ConfigError(f"scorer {target!r}: {item.strip()!r} is not key=value")
        if key in params:
            raise ConfigError(f"scorer {target!r}: parameter {key!r} given twice")
        quoted = len(value) >= 2 and value[0] in "'\"" and value[-1] == value[0]
        params[key] = _Quoted(value[1:-1]) if quoted else value
    return Term(text, target, params, weight)


def _is_dir(text: str) -> bool:
    return bool(text) and Path(text).expanduser().is_dir()


def _build(term: Term, options: dict[str, Any]) -> Scorer:
    both = set(term.params) & set(options)
    if both:
        raise ConfigError(f"scorer {term.text!r}: {', '.join(sorted(both))} given both in the "
                          "spec and as options")
    params = {**term.params, **options}
    target = term.target
    if target in BUILTINS:
        scorer = _builtin(target, params)
    elif _is_dir(target):
        path = Path(target).expanduser()
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ConfigError(f"scorer {target!r} is a directory but not a model (no "
                              "config.json); give a reward model saved by prefalign")
        if "trust_remote_code" in term.params:
            # Model code runs only behind a command's own flag, never through a spec, which
            # can come from a config, a recipe or a data pipeline the user did not write.
            raise ConfigError(f"scorer {term.text!r}: trust_remote_code cannot be set in a "
                              "scorer spec; a reward model's own code runs only with the "
                              "--trust-remote-code flag of a command that has one (e.g. "
                              "prefalign score), else convert the model to a built-in "
                              "transformers architecture")
        scorer = RewardModelScorer(str(path), **{k: _literal(v) for k, v in params.items()})
    elif ":" in target:
        return _from_import(target, {k: _literal(v) for k, v in params.items()}, term.text)
    elif "/" in target or target.startswith((".", "~")):
        raise ConfigError(f"scorer {target!r}: no such reward-model directory")
    else:
        raise ConfigError(f"unknown scorer {target!r}; use one of {', '.join(BUILTINS)}, "
                          "module.path:function or a reward-model directory")
    scorer.name = term.text
    return scorer


def _builtin(name: str, params: dict[str, Any]) -> Scorer:
    cls, kinds, usage = BUILTINS[name]
    unknown = sorted(set(params) - set(kinds))
    if unknown:
        takes = f"it takes {', '.join(kinds)}" if kinds else "it takes none"
        raise ConfigError(f"scorer {name}: unknown parameter {unknown[0]!r}; {takes} ({usage})")
    return cls(**{k: _convert(v, kinds[k], f"{name}: {k}") for k, v in params.items()})


def _convert(value: Any, kind: str, where: str) -> Any:
    """A spec string (or an option's Python value) as the parameter's kind."""
    if not isinstance(value, str):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is None and kind == "int?" or kind == "bool" and isinstance(value, bool):
            return value
        if kind == "float" and number:
            return float(value)
        if kind in ("int", "int?") and number and value == int(value):
            return int(value)
        raise ConfigError(f"{where} must be {kind.rstrip('?')}, got {describe_value(value)}")
    if kind == "str":
        return str(value)
    low = value.strip().lower()
    if kind == "bool" and low in ("true", "false", "yes", "no", "1", "0"):
        return low in ("true", "yes", "1")
    if kind == "int?" and low in ("none", "null"):
        return None
    try:
        return float(low) if kind == "float" else int(low)
    except ValueError:
        pass
    raise ConfigError(f"{where} must be {kind.rstrip('?')}, got {value!r}")


def _literal(value: Any) -> Any:
    """An unquoted spec value as int, float, bool or None when it reads as one."""
    if isinstance(value, _Quoted):
        return str(value)
    if not isinstance(value, str):
        return value
    low = value.lower()
    if low in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[low]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _from_import(target: str, params: dict[str, Any], text: str) -> Scorer:
    module_name, _, attr = target.rpartition(":")  # rpartition: a path may hold a drive's ':'
    if not module_name or not attr:
        raise ConfigError(f"scorer {target!r}: write an import path as module.path:function "
                          "or path/to/file.py:function")
    if _is_file_path(module_name):
        module, where = _import_file(module_name, target), "file"
    else:
        module, where = _import_module(module_name, attr, target), "module"
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")
                     and callable(getattr(module, n))][:20]
            raise ConfigError(f"scorer {target!r}: {where} {module_name!r} has no attribute "
                              f"{attr!r} (its callables: {', '.join(names) or 'none'})")
        obj = getattr(obj, part)
    if isinstance(obj, Scorer):
        if params:
            raise ConfigError(f"scorer {target!r} is a ready Scorer; it takes no parameters")
        return obj
    if not callable(obj):
        raise ConfigError(f"scorer {target!r} is a {type(obj).__name__}, not a function")
    is_class = isinstance(obj, type) and issubclass(obj, Scorer)
    if is_class:
        _check_call(obj, (), {}, params, target)
        scorer = obj(**params)
        scorer.name = text
        return scorer
    if is_trl_reward_function(obj):
        _check_call(obj, (), {"prompts": [], "completions": []}, params, target, trl=True)
    else:
        _check_call(obj, ([], []) if getattr(obj, "batched", False) else ("", ""), {}, params,
                    target)
    return FunctionScorer(obj, params, text)


def _is_file_path(module_name: str) -> bool:
    return (module_name.endswith(".py") or "/" in module_name or "\\" in module_name
            or module_name.startswith("~"))


@contextmanager
def _first_on_path(directory: str) -> Iterator[None]:
    """`directory` searched first by imports inside, as `python -m` searches the working
    directory; sys.path is as before afterwards."""
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        if sys.path and sys.path[0] == directory:
            del sys.path[0]
        elif directory in sys.path:
            sys.path.remove(directory)


def _import_module(module_name: str, attr: str, target: str) -> ModuleType:
    """module.path, searched in the working directory first, then on sys.path."""
    cwd = os.getcwd()
    local = Path(cwd, *module_name.split(".")).with_suffix(".py")
    if local.is_file():
        # Keyed by its path: a same-named module imported earlier from elsewhere (another
        # working directory of this process) must not shadow the file the user points at.
        return _import_file(str(local), target)
    try:
        with _first_on_path(cwd):
            return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            file = Path(cwd, *module_name.split(".")).with_suffix(".py")
            raise ConfigError(
                f"scorer {target!r}: cannot import module {module_name!r}: it is neither in the "
                f"working directory (no {file}) nor on the Python path; run from the directory "
                f"that holds it or give its file, e.g. path/to/{file.name}:{attr}") from None
        raise ConfigError(f"scorer {target!r}: importing module {module_name!r} failed: "
                          f"{type(e).__name__}: {e}") from e
    except Exception as e:  # the module's own code failed: name it, keep the cause for --debug
        raise ConfigError(f"scorer {target!r}: importing module {module_name!r} failed: "
                          f"{type(e).__name__}: {e}") from e


def _import_file(module_name: str, target: str) -> ModuleType:
    """A Python file by path (relative to the working directory, or absolute), imported
    with its own directory first on the path so it may import its neighbours."""
    path = Path(module_name).expanduser()
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not path.is_file():
        raise ConfigError(f"scorer {target!r}: no file {path} (a relative path is read from "
                          f"the working directory {os.getcwd()})")
    if path.suffix != ".py":
        raise ConfigError(f"scorer {target!r}: {path} is not a .py file")
    # One module per file: the name holds a digest of the path, so two files with the same
    # name in different directories stay apart, and importing the same file twice reuses it.
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_prefalign_scorer_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"scorer {target!r}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as import does (dataclasses need it)
    try:
        with _first_on_path(str(path.parent)):
            spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"scorer {target!r}: importing {path} failed: "
                          f"{type(e).__name__}: {e}") from e
    return module


FORMS = ("fn(prompt, response, **params) -> number; with `batched = True`, "
         "fn(prompts, responses, **params) -> numbers; or TRL's "
         "fn(prompts, completions, **kwargs) -> list of numbers")


def _check_call(fn: Callable, args: tuple, kwargs: dict[str, Any], params: dict[str, Any],
                target: str, trl: bool = False) -> None:
    """Fail now, not mid-generation, when the parameters do not fit the signature. The TRL
    form may also name data columns, which only the rows supply: those are checked per call."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-ins have no signature: nothing to check
        return
    try:
        if trl:
            signature.bind_partial(*args, **kwargs, **params)
        else:
            signature.bind(*args, **kwargs, **params)
    except TypeError as e:
        if isinstance(fn, type):
            raise ConfigError(f"scorer {target!r}: the call does not fit its signature: "
                              f"{e}") from None
        extra = f" with parameters {', '.join(params)}" if params else ""
        raise ConfigError(f"scorer {target!r}: its signature {signature}{extra} fits no "
                          f"reward-function form ({e}); write {FORMS}") from None
