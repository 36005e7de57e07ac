"""Benchmark rows of an evaluation: prompts with a reference answer or a test command.

A prompt row with an `answer` (else `reference`) field is checked by
scoring.answer_check (the last \\boxed{} or number against the answer, text after
normalisation): benchmark/accuracy. A row with a `test` field has that command run on each
response's extracted code by the command scorer (scoring.command.Command: a fresh
temporary directory, the code in solution.py, {file} and {dir} placeholders, a timeout,
the whole process group killed at the end): benchmark/pass_rate, exit status 0 passing.
Each is the mean over the samples of the rows that carry the field; its 95% interval
resamples those prompts (evaluation.summary). Rows without either field are left out of
both; the other metrics use every row.

Answer checks run whenever rows carry answers. Test commands execute model-written code,
so they run only when asked for (`benchmark=True`, `--benchmark`); nothing is sandboxed
beyond the temporary directory and the timeout: run them in a container without network.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from prefalign.errors import ConfigError, DataError

ANSWER_KEYS = ("answer", "reference")
CORRECT, PASSED = "benchmark_correct", "benchmark_passed"  # sample fields, 0.0 or 1.0
# metric -> the sample field it averages.
FIELDS = {"benchmark/accuracy": CORRECT, "benchmark/pass_rate": PASSED}


def prompt_rows(prompts: Any) -> tuple[list, list[dict[str, Any]]]:
    """(prompts, each prompt's other fields) from a prompt file or a list of prompts (text,
    chat messages, or rows with a `prompt` field and, for a benchmark, `answer` or `test`)."""
    if isinstance(prompts, (str, bytes)) or hasattr(prompts, "__fspath__"):
        from prefalign.data.prompts import load_prompts

        rows = load_prompts(str(prompts))
        return [r["prompt"] for r in rows], [dict(r.get("extra_columns") or {}) for r in rows]
    prompts = list(prompts)
    if not prompts:
        raise DataError("evaluate: no prompts")
    out = [p["prompt"] if isinstance(p, dict) else p for p in prompts]
    extras = [{k: v for k, v in p.items() if k != "prompt"} if isinstance(p, dict) else {}
              for p in prompts]
    return out, extras


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _answer(extra: Mapping[str, Any]) -> Any:
    for key in ANSWER_KEYS:
        if _given(extra.get(key)):
            return extra[key]
    return None


class Benchmark:
    """The answers and test commands of the prompt rows, checked before any sampling."""

    def __init__(self, extras: Sequence[Mapping[str, Any]], enabled: bool | None,
                 timeout: float = 10.0, source: str = "--prompts"):
        from prefalign.scoring import Command

        self.answers: dict[int, Any] = {}
        self.tests: dict[int, Any] = {}
        for i, extra in enumerate(extras):
            answer = _answer(extra)
            if answer is not None:
                if not isinstance(answer, (str, int, float)):
                    raise DataError(f"{source} row {i + 1}: field 'answer' must be a number or "
                                    f"text, got {type(answer).__name__}")
                self.answers[i] = answer
            if _given(extra.get("test")):
                if not isinstance(extra["test"], str):
                    raise DataError(f"{source} row {i + 1}: field 'test' must be a command "
                                    f"line (text), got {type(extra['test']).__name__}")
                self.tests[i] = extra["test"]
        if enabled and not (self.answers or self.tests):
            raise ConfigError(f"--benchmark: no row of {source} has an 'answer', 'reference' "
                              "or 'test' field; add one, or drop --benchmark")
        if enabled is False:
            self.answers, self.tests = {}, {}
        self.skipped_tests = 0
        if self.tests and not enabled:  # auto mode never runs model-written code
            self.skipped_tests, self.tests = len(self.tests), {}
        if isinstance(timeout, bool) or not timeout > 0:
            raise ConfigError(f"--benchmark-timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.commands: dict[str, Command] = {}
        for i, test in self.tests.items():
            if test not in self.commands:
                try:
                    self.commands[test] = Command(cmd=test, timeout=self.timeout)
                except ConfigError as e:
                    raise DataError(f"{source} row {i + 1}: field 'test': {e}") from None

    def __bool__(self) -> bool:
        return bool(self.answers or self.tests)

    def line(self) -> str:
        """The one line that says what the benchmark checks."""
        parts = []
        if self.answers:
            parts.append(f"{len(self.answers)} prompts with an answer (benchmark/accuracy)")
        if self.tests:
            parts.append(f"{len(self.tests)} with a test command, run with a "
                         f"{self.timeout:g} s timeout (benchmark/pass_rate)")
        if self.skipped_tests:
            parts.append(f"{self.skipped_tests} test commands not run (they execute "
                         "model-written code: pass --benchmark to run them)")
        return "benchmark: " + "; ".join(parts)

    def settings(self) -> dict[str, Any]:
        return {"answers": len(self.answers), "tests": len(self.tests),
                "tests_not_run": self.skipped_tests, "timeout": self.timeout}

    def attach(self, samples: Mapping[str, list[dict[str, Any]]], prompts: Sequence,
               progress: bool = True) -> None:
        """Adds benchmark_correct / benchmark_passed (0.0 or 1.0) to the samples of the
        rows that carry an answer / a test."""
        from prefalign.scoring.answer_check import check_answer

        for name, rows in samples.items():
            for r in rows:
                if r["prompt_index"] in self.answers:
                    r[CORRECT] = float(check_answer(r["text"], self.answers[r["prompt_index"]]))
            tested = [r for r in rows if r["prompt_index"] in self.tests]
            if tested and progress:
                print(f"evaluate: {name}: running {len(tested)} test commands", file=sys.stderr,
                      flush=True)
            for r in tested:
                command = self.commands[self.tests[r["prompt_index"]]]
                result = command.run(str(prompts[r["prompt_index"]]), r["text"])
                r[PASSED] = 1.0 if result.passed else 0.0


def benchmark_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, int]]]:
    """{metric: [(value, prompt index)]} over the samples that carry it (pure)."""
    out = {}
    for metric, key in FIELDS.items():
        pairs = [(float(r[key]), r["prompt_index"]) for r in rows if r.get(key) is not None]
        if pairs:
            out[metric] = pairs
    return out
