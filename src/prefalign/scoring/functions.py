"""Python functions as scorers, and importing them from a spec's module:attr or file.py:attr.

A function scores one pair, fn(prompt, response, **params) -> number, unless it has the
attribute `batched = True` (the @batched decorator sets it): then it scores a batch,
fn(prompts, responses, **params) -> numbers. The attribute decides, never a trial call: a
per-item function handed lists can return a plausible number. A function with a parameter
named `completions` is in TRL's form (GRPOTrainer's reward functions),
fn(prompts, completions, **kwargs) -> list of numbers, called by keyword once per batch with
the prompt rows' other columns as keyword arguments (one list per column; none when the
caller has no rows, as in evaluate); a None in the list (TRL's "no reward") is an error.

Import paths name a function, a Scorer instance or a Scorer subclass (built with the
parameters). `module.path:attr` is imported with the working directory searched first
(as `python -m` does), then the Python path; `path/to/file.py:attr` (relative to the
working directory, or absolute) imports that file, with its own directory searched first
for its imports. Either way the module's code runs, like a script: name only code you trust.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from prefalign.errors import ConfigError, PrefalignError
from prefalign.scoring.base import Scorer, describe_value


def batched(fn: Callable) -> Callable:
    """Mark fn(prompts, responses) -> numbers as scoring whole batches (sets fn.batched)."""
    fn.batched = True
    return fn


# Keyword names TRL's GRPOTrainer gives a reward function itself; data columns of these
# names are not passed (TRL leaves out "prompt", "completion" and "completion_ids" alike).
TRL_RESERVED = ("prompts", "completions", "prompt", "completion", "completion_ids",
                "trainer_state")


def is_trl_reward_function(fn: Callable) -> bool:
    """TRL's form, fn(prompts, completions, **kwargs) -> list[float], is told by a parameter
    named `completions` (TRL passes everything by keyword; `prompts` may sit in **kwargs)."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: our form
        return False


class FunctionScorer(Scorer):
    """A plain function as a scorer, in one of three forms:
    fn(prompt, response, **params) -> number (per item); the same over lists when
    `fn.batched` is true; TRL's fn(prompts, completions, **kwargs) -> list of numbers,
    called by keyword with the rows' other columns (see is_trl_reward_function)."""

    def __init__(self, fn: Callable, params: dict | None = None, name: str | None = None):
        self.fn, self.params = fn, dict(params or {})
        self.trl = is_trl_reward_function(fn)
        self.batched = self.trl or bool(getattr(fn, "batched", False))
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def _score_columns(self, prompts: list[str], responses: list[str],
                       columns: dict[str, list[Any]]) -> Sequence[Any]:
        if not self.trl:
            return self._score(prompts, responses)
        data = {k: v for k, v in columns.items() if k not in TRL_RESERVED}
        both = sorted(set(data) & set(self.params))
        if both:
            raise PrefalignError(f"scorer {self.name}: {both[0]!r} is both a spec parameter "
                                 "and a column of the data; rename one")
        kwargs = {"prompts": prompts, "completions": responses, **data, **self.params}
        parameters = inspect.signature(self.fn).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in parameters}
        needed = [n for n, p in parameters.items() if n not in kwargs
                  and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if needed:
            have = ", ".join(sorted(data)) or "none"
            raise PrefalignError(f"scorer {self.name} needs {needed[0]!r}, which is not a "
                                 f"column of the prompt rows (their other columns: {have})")
        scores = self.fn(**kwargs)
        if isinstance(scores, (numbers.Real, str)) or scores is None:
            raise PrefalignError(
                f"scorer {self.name} (TRL form: it takes `completions`) returned "
                f"{describe_value(scores)}; it must return a list with one number per completion")
        return scores

    def _score(self, prompts: list[str], responses: list[str]) -> Sequence[Any]:
        if self.trl:
            return self._score_columns(prompts, responses, {})
        if self.batched:
            scores = self.fn(prompts, responses, **self.params)
            if isinstance(scores, (numbers.Real, str)):
                raise PrefalignError(
                    f"scorer {self.name} is marked batched = True but returned "
                    f"{describe_value(scores)}; a batched function returns one number per response")
            return scores
        scores = [self.fn(p, r, **self.params) for p, r in zip(prompts, responses)]
        for i, value in enumerate(scores):
            if isinstance(value, (list, tuple)):
                raise PrefalignError(
                    f"scorer {self.name} returned a {type(value).__name__} for the single "
                    f"response at position {i}; a function that scores whole batches needs "
                    "`batched = True` (the @batched decorator)")
        return scores



def import_scorer(target: str, params: dict[str, Any], text: str) -> Scorer:
    """The scorer `target` (module.path:attr or path/to/file.py:attr) names, built with
    `params`; `text`: the term as written, its name."""
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
