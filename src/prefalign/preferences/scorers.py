"""Scorers: rule-based and model-based rewards behind one batched interface.

A scorer maps (prompts: list[str], responses: list[str]) to one float per pair; best-of-N
ranks samples by it, PPO uses it as a reward and evaluation reports it. Every call is
checked: one finite number per pair, else a PrefalignError naming the scorer (None, TRL's
"no reward for this sample", is refused too: every response needs a number). A call may
also pass `columns`, the prompt rows' other fields ({name: one value per response}); only
functions written in TRL's form read them. Specs that name scorers are parsed by
preferences.scorer_spec.

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
  math_answer  the response's final answer (last \\boxed{...}, else last number; a text
      answer: last line) equals the row's `answer` (else `reference`) column, numbers to a
      relative 1e-6, text after case and whitespace normalisation (preferences.answer_check).
"""

from __future__ import annotations

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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.errors import ConfigError, PrefalignError


class Scorer:
    """Base class: subclasses implement `_score`; calling a scorer checks what it returns."""

    name = "scorer"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None) -> list[float]:
        """columns: the rows' other fields, {name: one value per response}, or None."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise PrefalignError(
                f"scorer {self.name}: {len(prompts)} prompts but {len(responses)} responses"
            )
        columns = {k: list(v) for k, v in (columns or {}).items()}
        wrong = [k for k, v in columns.items() if len(v) != len(responses)]
        if wrong:
            raise PrefalignError(f"scorer {self.name}: column {wrong[0]!r} has "
                                 f"{len(columns[wrong[0]])} values for {len(responses)} responses")
        if not responses:
            return []
        return check_scores(self._score_columns(prompts, responses, columns), len(responses),
                            self.name)

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              columns: Mapping[str, Sequence[Any]] | None = None) -> list[float]:
        """The same as calling the scorer; named like RewardScorer.score."""
        return self(prompts, responses, columns)

    def _score_columns(self, prompts: list[str], responses: list[str],
                       columns: dict[str, list[Any]]) -> Sequence[Any]:
        """Scorers that read the rows' other fields override this; the rest ignore them."""
        return self._score(prompts, responses)

    def _score(self, prompts: list[str], responses: list[str]) -> Sequence[Any]:
        raise NotImplementedError


def row_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """{name: [value per row]} from prompt rows that carry their other fields under
    "extra_columns" (data.prompts.load_prompts); a field missing from some rows is None
    there; {} when no row has any."""
    extras = [row.get("extra_columns") or {} for row in rows]
    names: dict[str, None] = {}
    for extra in extras:
        names.update(dict.fromkeys(extra))
    return {name: [extra.get(name) for extra in extras] for name in names}


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
            f"scorer {name} returned {describe_value(scores)}, not a list of {count} numbers"
        )
    if len(scores) != count:
        raise PrefalignError(f"scorer {name} returned {len(scores)} scores for {count} responses")
    checked = []
    for i, value in enumerate(scores):
        if hasattr(value, "item") and not isinstance(value, numbers.Real):
            value = value.item()  # a 0-d tensor or array per item
        if value is None:
            raise PrefalignError(
                f"scorer {name} returned None at position {i} (no reward for that response); "
                "every response needs a number: return a default such as 0.0 instead")
        if not isinstance(value, numbers.Real):
            raise PrefalignError(
                f"scorer {name} returned {describe_value(value)} at position {i}; scores are numbers"
            )
        if not math.isfinite(value):
            raise PrefalignError(f"scorer {name} returned {value} at position {i}; "
                                 "scores must be finite")
        checked.append(float(value))
    return checked


def describe_value(value: Any) -> str:
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


class MathAnswer(Scorer):
    """1.0 when the response's final answer matches the row's `answer` (else `reference`)."""

    name = "math_answer"

    def _score_columns(self, prompts: list[str], responses: list[str],
                       columns: dict[str, list[Any]]) -> list[float]:
        from prefalign.preferences.answer_check import check_answer

        key = "answer" if "answer" in columns else "reference" if "reference" in columns else None
        if key is None:
            raise PrefalignError(f"scorer math_answer needs an 'answer' (or 'reference') column "
                                 f"in the prompt rows (their other columns: "
                                 f"{', '.join(sorted(columns)) or 'none'})")
        return [float(check_answer(r, a)) for r, a in zip(responses, columns[key])]

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self._score_columns(prompts, responses, {})


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

    def components(self, prompts: Sequence[str], responses: Sequence[str],
                   columns: Mapping[str, Sequence[Any]] | None = None) -> list[tuple]:
        """[(name, weight, scores)] per term, unweighted: to log what the sum is made of."""
        return [(s.name, w, s(prompts, responses, columns)) for s, w in self.terms]

    def _score_columns(self, prompts: list[str], responses: list[str],
                       columns: dict[str, list[Any]]) -> list[float]:
        total = [0.0] * len(responses)
        for scorer, weight in self.terms:
            for i, value in enumerate(scorer(prompts, responses, columns)):
                total[i] += weight * value
        return total

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self._score_columns(prompts, responses, {})


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
    "math_answer": (MathAnswer, {}, "math_answer: 1 when the last \\boxed{} or number (text: "
                    "last line) equals the row's `answer` column"),
}
