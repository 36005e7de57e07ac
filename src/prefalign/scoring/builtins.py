"""The built-in scorers and their typed parameters.

Each built-in's parameters are a small frozen dataclass of option(...) fields, filled from a
spec's key=value text (or Python values) by the config machinery (scoring.spec), so a typo
names the closest valid parameter and a wrong type is refused in one line.

Built-ins score 0.0 or 1.0 (length with falloff > 0 also scores in between):
  length(min=0,max=none,falloff=0)  the response's characters, leading and trailing
      whitespace ignored, number min..max; with falloff=F the score falls linearly from 1
      to 0 over F characters outside the bounds (a smoother reward for PPO).
  regex(pattern=P,must=true,ignore_case=false)  re.search(P, response) finds a match
      (must=true) or finds none (must=false); anchor with ^ and $ for the whole response.
  json_valid(extract=true)  the stripped response is JSON; with extract=true it is also
      enough that some "{" or "[" in it opens a complete JSON object or array, so JSON
      inside prose or a ``` fence counts.
  python_compiles  compile() accepts the code, which is never executed. The code is the
      first ```python (or py, python3) fenced block, else the first untagged ``` block,
      else the whole response; empty code scores 0.
  command(cmd='python {file}',timeout=10,shell=false,filename=solution.py,workers=1,
      network=true)  EXECUTES MODEL-WRITTEN CODE, only when named in a spec: exit status 0
      of cmd run on the response's code scores 1.0; network=false cuts it off the network
      (scoring.command says how and what is not safe).
  math_answer  the response's final answer (last \\boxed{...}, else last number; a text
      answer: last line) equals the row's `answer` (else `reference`) column, numbers to a
      relative 1e-6, text after case and whitespace normalisation (scoring.answer_check).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

from prefalign.config import option
from prefalign.errors import ConfigError, PrefalignError
from prefalign.scoring.base import ItemScorer, Scorer
from prefalign.scoring.code import extract_code
from prefalign.scoring.command import Command, CommandParams


@dataclass(frozen=True)
class LengthParams:
    min: int = option(0, "fewest characters of the stripped response")
    max: int | None = option(None, "most characters; none: no upper bound")
    falloff: float = option(0.0, "characters over which the score falls from 1 to 0 outside "
                            "the bounds; 0: a step")


@dataclass(frozen=True)
class RegexParams:
    pattern: str | None = option(None, "the regular expression re.search looks for")
    must: bool = option(True, "score 1 when it matches (false: when it does not)")
    ignore_case: bool = option(False, "match regardless of case")


@dataclass(frozen=True)
class JsonValidParams:
    extract: bool = option(True, "a {...} or [...] block inside the response counts too")


@dataclass(frozen=True)
class NoParams:
    """A built-in that takes no parameters."""


class Length(ItemScorer):
    def __init__(self, min: int = 0, max: int | None = None, falloff: float = 0.0):
        if max is None and min <= 0:
            raise ConfigError("length: give min and/or max, e.g. length(min=10,max=200)")
        if min < 0 or (max is not None and max < min) or falloff < 0:
            raise ConfigError(f"length: need 0 <= min <= max and falloff >= 0, got "
                              f"min={min}, max={max}, falloff={falloff}")
        self.low, self.high, self.falloff = min, max, falloff

    def score_one(self, prompt: str, response: str) -> float:
        n = len(response.strip())
        over = n - self.high if self.high is not None else 0
        distance = max(self.low - n, over, 0)
        if distance == 0:
            return 1.0
        if self.falloff == 0:
            return 0.0
        return max(0.0, 1.0 - distance / self.falloff)


class Regex(ItemScorer):
    def __init__(self, pattern: str | None = None, must: bool = True, ignore_case: bool = False):
        if pattern is None:
            raise ConfigError("regex: give pattern=..., e.g. regex(pattern='^\\{')")
        try:
            self.regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as e:
            raise ConfigError(f"regex: invalid pattern {pattern!r}: {e}") from None
        self.must = must

    def score_one(self, prompt: str, response: str) -> float:
        return float((self.regex.search(response) is not None) == self.must)


class JsonValid(ItemScorer):
    def __init__(self, extract: bool = True):
        self.extract = extract

    def score_one(self, prompt: str, response: str) -> float:
        text = response.strip()
        try:
            _STRICT_JSON.decode(text)
            return 1.0
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            pass
        if self.extract:
            for match in re.finditer(r"[{\[]", text):
                try:
                    _STRICT_JSON.raw_decode(text, match.start())
                except (ValueError, RecursionError):
                    continue
                return 1.0
        return 0.0


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# Python's json accepts NaN and Infinity; JSON itself (RFC 8259) does not.
_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)


class PythonCompiles(ItemScorer):
    def score_one(self, prompt: str, response: str) -> float:
        code = extract_code(response)
        if not code.strip():
            return 0.0
        try:
            with warnings.catch_warnings():  # e.g. invalid escapes: noise, not failure
                warnings.simplefilter("ignore")
                # dont_inherit: this module's __future__ flags must not change the verdict.
                compile(code, "<response>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
            return 0.0
        return 1.0


class MathAnswer(Scorer):
    """1.0 when the response's final answer matches the row's `answer` (else `reference`)."""

    name = "math_answer"

    def _score_columns(self, prompts: list[str], responses: list[str],
                       columns: dict[str, list[Any]]) -> list[float]:
        from prefalign.scoring.answer_check import check_answer

        key = "answer" if "answer" in columns else "reference" if "reference" in columns else None
        if key is None:
            raise PrefalignError(f"scorer math_answer needs an 'answer' (or 'reference') column "
                                 f"in the prompt rows (their other columns: "
                                 f"{', '.join(sorted(columns)) or 'none'})")
        return [float(check_answer(r, a)) for r, a in zip(responses, columns[key])]

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self._score_columns(prompts, responses, {})


class Builtin(NamedTuple):
    cls: type[Scorer]
    params: type  # the dataclass of its parameters
    usage: str


# The keys also build SCORER_HELP and the "unknown scorer" error, so the names never drift
# apart; a parameter list ("it takes ...") comes from the params dataclass.
BUILTINS: dict[str, Builtin] = {
    "length": Builtin(Length, LengthParams,
                      "length(min=0,max=none,falloff=0): 1 when the stripped response has "
                      "min..max characters"),
    "regex": Builtin(Regex, RegexParams,
                     "regex(pattern=P,must=true,ignore_case=false): 1 when re.search finds P "
                     "(must=false: finds none)"),
    "json_valid": Builtin(JsonValid, JsonValidParams,
                          "json_valid(extract=true): 1 when the response, or a {...} or [...] "
                          "block in it, is valid JSON"),
    "python_compiles": Builtin(PythonCompiles, NoParams,
                               "python_compiles: 1 when the ```python block (else the "
                               "response) compiles; never run"),
    "command": Builtin(Command, CommandParams,
                       "command(cmd='python {file}',timeout=10,shell=false,filename=solution.py,"
                       "workers=1,network=true): 1 when cmd exits 0 on the response's code "
                       "within timeout seconds; network=false: without network; EXECUTES "
                       "MODEL-WRITTEN CODE"),
    "math_answer": Builtin(MathAnswer, NoParams,
                           "math_answer: 1 when the last \\boxed{} or number (text: last line) "
                           "equals the row's `answer` column"),
}
