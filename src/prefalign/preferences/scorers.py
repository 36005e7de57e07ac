"""Scorers: rule-based and model-based rewards behind one batched interface.

A scorer maps (prompts: list[str], responses: list[str]) to one float per pair; best-of-N
ranks samples by it, PPO uses it as a reward and evaluation reports it. Every call is
checked: one finite number per pair, else a PrefalignError naming the scorer.
`load_scorer(spec)` builds one from a spec string:

    SPEC    := TERM ("," TERM)*
    TERM    := SCORER [":" WEIGHT]
    SCORER  := NAME ["(" key=value, ... ")"]            a built-in (below)
             | module.path:attr ["(" key=value, ... ")"] a function or Scorer subclass
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
a reward model, whatever characters its path holds.

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
  command(cmd='python {file}',timeout=10,shell=false,filename=solution.py,workers=1)
      EXECUTES MODEL-WRITTEN CODE, only when named in a spec. The code (found as for
      python_compiles) is written to FILENAME in a fresh temporary directory and cmd runs
      there with output captured (see `last_results`); exit status 0 scores 1.0, anything
      else 0.0. A timeout scores 0.0; either way the command's whole process group is
      killed when it ends, so nothing it started lingers. Placeholders: {file}
      the code file, {dir} the directory, {prompt_file} a file holding the prompt (written
      only when cmd names it). Without shell=true no shell runs: cmd is split like a POSIX
      shell line and each placeholder stays one argument; a first word "python" means this
      interpreter (sys.executable). Nothing is sandboxed beyond the temporary directory and
      the timeout: the code runs with your rights and environment, so run it in a container.

Import paths name a function, a Scorer instance or a Scorer subclass (built with the
parameters). A function scores one pair, fn(prompt, response, **params) -> number, unless
it has the attribute `batched = True` (the @batched decorator sets it): then it scores a
batch, fn(prompts, responses, **params) -> numbers. The attribute decides, never a trial
call: a per-item function handed lists can return a plausible number. Unquoted parameter
values of import paths and reward models become int, float, bool (true/false) or None
(none) when they read as one; quoted values stay strings. True and False score 1.0 and 0.0.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.errors import ConfigError, PrefalignError


class Scorer:
    """Base class: subclasses implement `_score`; calling a scorer checks what it returns."""

    name = "scorer"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise PrefalignError(
                f"scorer {self.name}: {len(prompts)} prompts but {len(responses)} responses"
            )
        if not responses:
            return []
        return check_scores(self._score(prompts, responses), len(responses), self.name)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The same as calling the scorer; named like RewardScorer.score."""
        return self(prompts, responses)

    def _score(self, prompts: list[str], responses: list[str]) -> Sequence[Any]:
        raise NotImplementedError


class ItemScorer(Scorer):
    """A scorer defined one (prompt, response) pair at a time."""

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.score_one(p, r) for p, r in zip(prompts, responses)]

    def score_one(self, prompt: str, response: str) -> float:
        raise NotImplementedError


def check_scores(scores: Any, count: int, name: str) -> list[float]:
    """`scores` as `count` finite floats, or a PrefalignError naming the scorer."""
    if hasattr(scores, "tolist"):  # numpy arrays and torch tensors
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise PrefalignError(
            f"scorer {name} returned {_describe(scores)}, not a list of {count} numbers"
        )
    if len(scores) != count:
        raise PrefalignError(f"scorer {name} returned {len(scores)} scores for {count} responses")
    checked = []
    for i, value in enumerate(scores):
        if hasattr(value, "item") and not isinstance(value, numbers.Real):
            value = value.item()  # a 0-d tensor or array per item
        if not isinstance(value, numbers.Real):
            raise PrefalignError(
                f"scorer {name} returned {_describe(value)} at position {i}; scores are numbers"
            )
        if not math.isfinite(value):
            raise PrefalignError(f"scorer {name} returned {value} at position {i}; "
                                 "scores must be finite")
        checked.append(float(value))
    return checked


def _describe(value: Any) -> str:
    return f"a {type(value).__name__} ({value!r:.40})"


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


# A fence opens at a line start with an optional tag; an unclosed fence (a truncated
# generation) runs to the end of the response.
_FENCE = re.compile(r"^```[ \t]*([\w.+-]*)[^\n]*\n(.*?)(?:^```|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = ("python", "py", "python3")


def extract_code(response: str) -> str:
    """The first ```python block, else the first untagged ``` block, else the response."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    for wanted in (_PYTHON_TAGS, ("",)):
        for tag, code in blocks:
            if tag in wanted:
                return code
    return response


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


@dataclass
class CommandResult:
    """One run of the command scorer; returncode None means it was killed at the timeout."""

    returncode: int | None
    output: str  # stdout and stderr interleaved, the last 4000 characters

    @property
    def passed(self) -> bool:
        return self.returncode == 0


class Command(Scorer):
    """Runs a user-given command on each response's code (see the module docstring)."""

    def __init__(self, cmd: str = "python {file}", timeout: float = 10.0, shell: bool = False,
                 filename: str = "solution.py", workers: int = 1):
        if timeout <= 0 or workers < 1:
            raise ConfigError(f"command: need timeout > 0 and workers >= 1, got "
                              f"timeout={timeout}, workers={workers}")
        if not filename or Path(filename).name != filename or filename == "prompt.txt":
            raise ConfigError(f"command: filename must be a plain file name, got {filename!r}")
        try:
            self.argv = shlex.split(cmd)
        except ValueError as e:
            raise ConfigError(f"command: cannot split cmd {cmd!r}: {e}") from None
        if not self.argv:
            raise ConfigError("command: cmd is empty; e.g. command(cmd='python {file}')")
        self.cmd, self.timeout, self.shell = cmd, timeout, shell
        self.filename, self.workers = filename, workers
        self.last_results: list[CommandResult] = []  # kept to show why responses failed

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        with ThreadPoolExecutor(self.workers) as pool:  # threads only wait on processes
            self.last_results = list(pool.map(self.run, prompts, responses))
        return [1.0 if r.passed else 0.0 for r in self.last_results]

    def run(self, prompt: str, response: str) -> CommandResult:
        with tempfile.TemporaryDirectory(prefix="prefalign-score-") as tmp:
            file = Path(tmp) / self.filename
            file.write_text(extract_code(response), encoding="utf-8")
            places = {"{file}": str(file), "{dir}": tmp}
            if "{prompt_file}" in self.cmd:
                places["{prompt_file}"] = str(Path(tmp) / "prompt.txt")
                Path(places["{prompt_file}"]).write_text(prompt, encoding="utf-8")
            return self._run(self._command(places), tmp)

    def _command(self, places: dict[str, str]) -> str | list[str]:
        if self.shell:
            line = self.cmd
            for key, value in places.items():
                line = line.replace(key, shlex.quote(value))
            return line
        argv = []
        for arg in self.argv:
            for key, value in places.items():
                arg = arg.replace(key, value)
            argv.append(arg)
        if argv[0] == "python":  # the same interpreter and packages as prefalign
            argv[0] = sys.executable
        return argv

    def _run(self, command: str | list[str], cwd: str) -> CommandResult:
        try:
            # A new session gives the command its own process group, so a timeout can
            # kill everything it started, not only the direct child.
            proc = subprocess.Popen(
                command, cwd=cwd, shell=self.shell, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise ConfigError(f"command: cannot run {self.argv[0]!r} (from cmd {self.cmd!r}): "
                              f"{e.strerror or e}") from None
        try:
            out, _ = proc.communicate(timeout=self.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
            _kill_group(proc)
            try:
                out, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a detached grandchild holds the pipe open
                out = b""
        finally:
            _kill_group(proc)  # nothing it started outlives its score, even on Ctrl-C
        return CommandResult(code, out.decode("utf-8", "replace")[-4000:])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass  # it ended on its own in the meantime


def batched(fn: Callable) -> Callable:
    """Mark fn(prompts, responses) -> numbers as scoring whole batches (sets fn.batched)."""
    fn.batched = True
    return fn


class FunctionScorer(Scorer):
    """A plain function as a scorer: per item unless `fn.batched` is true."""

    def __init__(self, fn: Callable, params: dict | None = None, name: str | None = None):
        self.fn, self.params = fn, dict(params or {})
        self.batched = bool(getattr(fn, "batched", False))
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def _score(self, prompts: list[str], responses: list[str]) -> Sequence[Any]:
        if self.batched:
            scores = self.fn(prompts, responses, **self.params)
            if isinstance(scores, (numbers.Real, str)):
                raise PrefalignError(
                    f"scorer {self.name} is marked batched = True but returned "
                    f"{_describe(scores)}; a batched function returns one number per response")
            return scores
        scores = [self.fn(p, r, **self.params) for p, r in zip(prompts, responses)]
        for i, value in enumerate(scores):
            if isinstance(value, (list, tuple)):
                raise PrefalignError(
                    f"scorer {self.name} returned a {type(value).__name__} for the single "
                    f"response at position {i}; a function that scores whole batches needs "
                    "`batched = True` (the @batched decorator)")
        return scores


class RewardModelScorer(Scorer):
    """A trained reward model directory, scored by prefalign.algorithms.reward.RewardScorer."""

    def __init__(self, path: str, **options: Any):
        try:  # imported on use: it pulls in torch and models, which rule scorers never need
            from prefalign.algorithms.reward import RewardScorer
        except ModuleNotFoundError as e:
            if e.name != "prefalign.algorithms.reward":
                raise
            raise PrefalignError(f"scorer {path!r} is a reward-model directory, but "
                                 "prefalign.algorithms.reward is not available") from None
        self.model = RewardScorer(path, **options)
        self.name = path

    def _score(self, prompts: list[str], responses: list[str]) -> Sequence[Any]:
        return self.model.score(prompts, responses)


class WeightedSum(Scorer):
    """sum_i weight_i * score_i over (scorer, weight) terms."""

    def __init__(self, terms: list[tuple[Scorer, float]]):
        self.terms = terms
        self.name = ",".join(f"{scorer.name}:{weight:g}" for scorer, weight in terms)

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple]:
        """[(name, weight, scores)] per term, unweighted: to log what the sum is made of."""
        return [(s.name, w, s(prompts, responses)) for s, w in self.terms]

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        total = [0.0] * len(responses)
        for scorer, weight in self.terms:
            for i, value in enumerate(scorer(prompts, responses)):
                total[i] += weight * value
        return total


# name -> (class, parameter kinds, usage). The keys also build SCORER_HELP and the
# "unknown scorer" error, so the names never drift apart.
BUILTINS: dict[str, tuple[type, dict[str, str], str]] = {
    "length": (Length, {"min": "int", "max": "int?", "falloff": "float"},
               "length(min=0,max=none,falloff=0): 1 when the stripped response has min..max "
               "characters"),
    "regex": (Regex, {"pattern": "str", "must": "bool", "ignore_case": "bool"},
              "regex(pattern=P,must=true,ignore_case=false): 1 when re.search finds P "
              "(must=false: finds none)"),
    "json_valid": (JsonValid, {"extract": "bool"},
                   "json_valid(extract=true): 1 when the response, or a {...} or [...] block "
                   "in it, is valid JSON"),
    "python_compiles": (PythonCompiles, {},
                        "python_compiles: 1 when the ```python block (else the response) "
                        "compiles; never run"),
    "command": (Command, {"cmd": "str", "timeout": "float", "shell": "bool", "filename": "str",
                          "workers": "int"},
                "command(cmd='python {file}',timeout=10,shell=false,filename=solution.py,"
                "workers=1): 1 when cmd exits 0 on the response's code; EXECUTES MODEL-WRITTEN "
                "CODE"),
}

SCORER_HELP = (
    "what scores a response: a built-in NAME(key=value,...), module.path:function, or a "
    "reward-model directory; join terms with ',' and weight them with ':W' for a weighted "
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
        if not (path / "config.json").is_file():
            raise ConfigError(f"scorer {target!r} is a directory but not a model (no "
                              "config.json); give a reward model saved by prefalign")
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
        raise ConfigError(f"{where} must be {kind.rstrip('?')}, got {_describe(value)}")
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
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"scorer {target!r}: write an import path as module.path:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"scorer {target!r}: cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # the module's own code failed: name it, keep the cause for --debug
        raise ConfigError(f"scorer {target!r}: importing module {module_name!r} failed: "
                          f"{type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")
                     and callable(getattr(module, n))][:20]
            raise ConfigError(f"scorer {target!r}: module {module_name!r} has no attribute "
                              f"{attr!r} (its callables: {', '.join(names) or 'none'})")
        obj = getattr(obj, part)
    if isinstance(obj, Scorer):
        if params:
            raise ConfigError(f"scorer {target!r} is a ready Scorer; it takes no parameters")
        return obj
    if not callable(obj):
        raise ConfigError(f"scorer {target!r} is a {type(obj).__name__}, not a function")
    is_class = isinstance(obj, type) and issubclass(obj, Scorer)
    _check_call(obj, () if is_class else ([], []) if getattr(obj, "batched", False)
                else ("", ""), params, target)
    if is_class:
        scorer = obj(**params)
        scorer.name = text
        return scorer
    return FunctionScorer(obj, params, text)


def _check_call(fn: Callable, args: tuple, params: dict[str, Any], target: str) -> None:
    """Fail now, not mid-generation, when the parameters do not fit the signature."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-ins have no signature: nothing to check
        return
    try:
        signature.bind(*args, **params)
    except TypeError as e:
        raise ConfigError(f"scorer {target!r}: the call does not fit its signature: {e}") from None
