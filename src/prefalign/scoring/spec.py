"""Scorer specs: one string that names a scorer or a weighted sum of them.

`load_scorer(spec)` builds the Scorer a spec describes:

    SPEC    := TERM ("," TERM)*
    TERM    := SCORER [":" WEIGHT]
    SCORER  := NAME ["(" key=value, ... ")"]            a built-in (scoring.builtins)
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

The built-ins are listed in scoring.builtins. Their parameters are typed (each built-in's
params dataclass) and converted by the config machinery: an unknown parameter is refused
naming the closest valid one, a value of the wrong type in one line. A reward-model
directory's parameters (RewardModelParams) are typed the same way. Import paths and their
forms are described in scoring.functions; their parameters declare no types here, so an
unquoted value becomes int, float, bool (true/false) or None (none) when it reads as one,
and a quoted value stays a string. True and False score 1.0 and 0.0.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.config import build_config, coerce, option
from prefalign.errors import ConfigError, PrefalignError
from prefalign.scoring.base import Scorer, WeightedSum, describe_value
from prefalign.scoring.builtins import BUILTINS
from prefalign.scoring.functions import FunctionScorer, import_scorer

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
    return combine_terms([(t, t.weight) for t in parse_spec(spec)], options, spec)


def combine_terms(items: list[tuple[Any, float | None]], options: dict[str, Any], what: str
                  ) -> Scorer:
    """One unweighted item built with `options`, else the WeightedSum of the items."""
    if len(items) == 1 and items[0][1] is None:
        return _build_item(items[0][0], options)
    if options:
        raise ConfigError(f"scorer {what!r} combines terms; write parameters into the spec as "
                          "name(key=value) instead of passing options")
    return WeightedSum([(_build_item(t, {}), 1.0 if w is None else w) for t, w in items])


def _build_item(item: Any, options: dict[str, Any]) -> Scorer:
    return _build(item, options) if isinstance(item, Term) else load_scorer(item, **options)


def parse_spec(spec: str) -> list[Term]:
    """Split a spec into terms; raises ConfigError naming the spec for bad syntax."""
    text = spec.strip()
    if is_dir(text):  # a directory path may hold ',', ':' or '('
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
    if match and text[: match.start()].strip() and not is_dir(text):
        weight = float(match.group(1))
        if not math.isfinite(weight):
            raise ConfigError(f"scorer spec {spec!r}: weight {match.group(1)} is not finite")
        text = text[: match.start()].strip()
    if is_dir(text) or "(" not in text:
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


def is_dir(text: str) -> bool:
    return bool(text) and Path(text).expanduser().is_dir()


def _build(term: Term, options: dict[str, Any]) -> Scorer:
    both = set(term.params) & set(options)
    if both:
        raise ConfigError(f"scorer {term.text!r}: {', '.join(sorted(both))} given both in the "
                          "spec and as options")
    target = term.target
    if target in BUILTINS:
        cls, params_cls, usage = BUILTINS[target]
        scorer = cls(**typed_params(target, params_cls, {**term.params, **options}, usage))
    elif is_dir(target):
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
        # Options are Python values (a tokenizer, a torch.device) handed on as they are.
        params = typed_params(term.text, RewardModelParams, term.params, REWARD_MODEL_USAGE)
        scorer = RewardModelScorer(str(path), **params, **options)
    elif ":" in target:
        params = {**term.params, **options}
        return import_scorer(target, {k: _literal(v) for k, v in params.items()}, term.text)
    elif "/" in target or target.startswith((".", "~")):
        raise ConfigError(f"scorer {target!r}: no such reward-model directory")
    else:
        raise ConfigError(f"unknown scorer {target!r}; use one of {', '.join(BUILTINS)}, "
                          "module.path:function or a reward-model directory")
    scorer.name = term.text
    return scorer


def typed_params(name: str, params_cls: type, values: dict[str, Any], usage: str
                 ) -> dict[str, Any]:
    """`values` (spec text or Python values) converted to the fields of `params_cls`, a
    dataclass of option(...) fields, by the config machinery: only the keys given, so each
    scorer keeps its own defaults. An unknown key names the closest valid one."""
    fields = [f.name for f in dataclasses.fields(params_cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        takes = f"it takes {', '.join(fields)}" if fields else "it takes none"
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        guess = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"scorer {name}: unknown parameter {unknown[0]!r}; {takes}{guess} "
                          f"({usage})")
    hints = typing.get_type_hints(params_cls)
    typed = {k: _typed(name, k, v, hints[k]) for k, v in values.items()}
    params = build_config(params_cls, typed, source=f"scorer {name}")
    return {k: getattr(params, k) for k in values}


def _typed(name: str, key: str, value: Any, hint: Any) -> Any:
    """`value` as the parameter's type; a quoted spec value of a text parameter stays as
    written (regex(pattern='none') is the text "none")."""
    kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    if isinstance(value, _Quoted) and kind is str:
        return str(value)
    try:
        return coerce(key, value, hint)
    except ConfigError:
        got = repr(value) if isinstance(value, str) else describe_value(value)
        raise ConfigError(f"{name}: {key} must be {kind.__name__}, got {got}") from None


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


@dataclass(frozen=True)
class RewardModelParams:
    """The spec parameters of a reward-model directory: RewardScorer's settings."""

    batch_size: int = option(8, "responses per forward pass")
    max_length: int | None = option(1024, "tokens kept of prompt + response")
    max_prompt_length: int | None = option(512, "tokens kept of the prompt")
    device: str | None = option(None, "where the model runs; none: cuda when available")
    chat_template: str | None = option(None, "a jinja file that replaces the tokenizer's")
    text_as_chat: bool = option(False, "render text prompts with the chat template")


REWARD_MODEL_USAGE = ("DIR(batch_size=8,max_length=1024,max_prompt_length=512,device=none,"
                      "chat_template=none,text_as_chat=false): a reward model's score")


class RewardModelScorer(Scorer):
    """A trained reward model directory, scored by scoring.reward_model.RewardScorer."""

    def __init__(self, path: str, **options: Any):
        try:  # imported on use: it pulls in torch and models, which rule scorers never need
            from prefalign.scoring.reward_model import RewardScorer
        except ModuleNotFoundError as e:
            if e.name != "prefalign.scoring.reward_model":
                raise
            raise PrefalignError(f"scorer {path!r} is a reward-model directory, but "
                                 "prefalign.scoring.reward_model is not available") from None
        self.model = RewardScorer(path, **options)
        self.name = path

    def _score(self, prompts: list[str], responses: list[str]) -> Sequence[Any]:
        return self.model.score(prompts, responses)
