"""`prefalign evaluate`: its config (options, YAML keys, checks) and the run from it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.config import Section, option, require
from prefalign.data.chat import ChatOptions
from prefalign.errors import ConfigError
from prefalign.generation import SamplingConfig, SamplingOptions
from prefalign.hub import DownloadOption, RemoteCodeOption

DESCRIPTION = ("Sample from several models on the same prompts with the same seeded settings, "
               "score the responses (reward model and/or scorer), compare rewards, win rates "
               "against a baseline, KL to a reference, diversity, length and EOS rate, and "
               "write report.json, report.md and a self-contained report.html. A chat "
               "template applies to every compared model's tokenizer; the reward model keeps "
               "its own.")


@dataclass(frozen=True)
class EvaluateJudgeOptions(Section):
    """The pairwise judge that `evaluate` may ask about every sample against the baseline."""

    SECTION = "judge"

    judge_model: str | None = option(
        None, "pairwise judge against --baseline: a local causal-LM directory, or with "
        "--judge-url the model name the endpoint serves. Each pair is asked in both orders; "
        "a verdict that flips counts 1/2. Adds win rate (judge), a length-controlled win "
        "rate and the position-flip rate", metavar="DIR|NAME")
    judge_url: str | None = option(None, "OpenAI-compatible base URL of the judge, e.g. "
                                   "http://localhost:8000/v1")
    api_key_env: str = option("OPENAI_API_KEY", "NAME of the environment variable holding "
                              "the judge endpoint's API key (never the key itself; unset: "
                              "no Authorization header)")
    judge_template: str | None = option(None, "judge prompt file with {prompt} and "
                                        "{candidates} (as `prefalign judge --template`; none "
                                        "= the built-in ranking prompt)")
    judge_retries: int = option(2, "asks after an unparsable answer before a pair is counted "
                                "as unjudged")
    judge_max_new_tokens: int = option(64, "judge answer length")
    judge_timeout: float = option(60.0, "seconds per judge HTTP request in all")

    def validate(self) -> None:
        require(self.judge_max_new_tokens >= 1, "judge_max_new_tokens", "must be >= 1")
        require(not self.judge_url or bool(self.judge_model), "judge_url",
                "needs judge_model too: give --judge-model NAME too (the model the endpoint "
                "serves)")
        require(not self.judge_template or bool(self.judge_model), "judge_template",
                "needs a judge: give --judge-model (and --judge-url for a served judge) too")
        super().validate()


@dataclass(frozen=True)
class EvaluateConfig(EvaluateJudgeOptions, SamplingOptions, ChatOptions, RemoteCodeOption,
                     DownloadOption):
    SECTION = ""
    COMMAND = "evaluate"

    models: list[str] = option([], "models to compare, in table order: model or adapter "
                               "directories, each NAME=DIR or DIR (named after its last "
                               "part)", nargs="+", metavar="NAME=DIR")
    prompts: str = option("", "prompt file (JSONL, JSON, Parquet, CSV, datasets dir)")
    reward_model: str | None = option(None, "reward-model directory: reward/* metrics and RM "
                                      "win rates")
    scorer: str | None = option(None, "scorer spec (e.g. \"length(max=200)\", module:function, "
                                "a reward-model directory): score/* metrics and scorer win "
                                "rates")
    baseline: str | None = option(None, "model that win rates are measured against (none = "
                                  "the first)")
    reference: str | None = option(None, "model name or directory for the KL (none = the "
                                   "first model)")
    runs: list[str] = option([], "training runs whose metrics.jsonl curves the report plots",
                             nargs="*", metavar="NAME=DIR")
    output_dir: str = option("eval-report", "where reports go")
    num_samples: int = option(1, "responses per prompt")
    batch_size: int = option(8, "prompts per generation batch")
    seed: int = option(0, "sampling seed, the same for every model")
    num_examples: int = option(3, "prompts shown with every model's response side by side")
    bootstrap: int = option(1000, "resamples of the 95% bootstrap intervals over prompts shown "
                            "as value ± half width on the reward, score, win-rate and KL "
                            "numbers (0: none)", metavar="N")
    benchmark: bool | None = option(
        None, "benchmark/accuracy and benchmark/pass_rate from --prompts rows with an "
        "`answer` (or `reference`: the response's last \\boxed{} or number, else its last "
        "line, must match) or a `test` command (run on the response's extracted code like "
        "the command scorer, {file} and {dir} filled in; exit 0 passes). None: answers are "
        "checked when rows carry them and test commands are not run; --benchmark runs them "
        "too (they EXECUTE MODEL-WRITTEN CODE: use a container without network); "
        "--no-benchmark: neither")
    benchmark_timeout: float = option(10.0, "limit per test command", metavar="SECONDS")
    finding: list[str] = option([], "a line shown at the top of the report (repeatable)",
                                metavar="TEXT", action="append")
    frontier: str | None = option(None, "file of extra reward-vs-KL curves: "
                                  "{\"label\": [[kl, reward], [kl, reward, \"point label\"], "
                                  "...]}", metavar="JSON")
    device: str | None = option(None, "cuda or cpu (none = cuda when available)")

    def validate(self) -> None:
        require(bool(self.models), "models", "is required (--models NAME=DIR ...)")
        require(bool(self.prompts), "prompts", "is required (--prompts FILE)")
        require(self.num_samples >= 1, "num_samples", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        super().validate()


def parse_named(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """["base=DIR", ...] -> {"base": "DIR"}; a bare DIR is named after its last component."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name or value, value
        if not name or not path:
            raise ConfigError(f"{flag}: expected NAME=DIR, got {value!r}")
        if name in out:
            raise ConfigError(f"{flag}: the name {name!r} is given twice")
        out[name] = path
    return out


def run_evaluate(config: EvaluateConfig) -> Path:
    """`prefalign evaluate`: prints and returns the path of report.html."""
    from prefalign.evaluation.evaluate import evaluate

    frontier = None
    if config.frontier:
        try:
            frontier = json.loads(Path(config.frontier).read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--frontier {config.frontier}: {exc}") from None
    judge, template = _judge(config)
    sampling = SamplingConfig.of(config, seed=config.seed, n=config.num_samples,
                                 batch_size=config.batch_size)
    result = evaluate(
        parse_named(config.models, "--models"), config.prompts, config.output_dir,
        reward_model=config.reward_model, scorer=config.scorer, reference=config.reference,
        baseline=config.baseline, sampling=sampling, runs=parse_named(config.runs, "--runs"),
        frontier=frontier, findings=config.finding, num_examples=config.num_examples,
        device=config.device, trust_remote_code=config.trust_remote_code,
        chat_template=config.chat_template, text_as_chat=config.text_as_chat,
        judge=judge, judge_template=template, judge_retries=config.judge_retries,
        bootstrap=config.bootstrap, judge_max_new_tokens=config.judge_max_new_tokens,
        benchmark=config.benchmark, benchmark_timeout=config.benchmark_timeout)
    print(result.html)
    return result.html


def _judge(config: EvaluateConfig) -> tuple[Any, str | None]:
    """(judge or None, template text or None); the judge is checked before sampling."""
    from prefalign.preferences.judge import load_template

    if not config.judge_model:
        return None, None
    template = load_template(config.judge_template) if config.judge_template else None
    if config.judge_url:
        from prefalign.preferences.http_judge import HttpJudge

        return HttpJudge(config.judge_url, config.judge_model, config.api_key_env,
                         config.judge_timeout,
                         max_new_tokens=config.judge_max_new_tokens), template
    if not Path(config.judge_model).is_dir():
        raise ConfigError(f"--judge-model {config.judge_model}: no such model directory; for "
                          "a served model also give --judge-url")
    return config.judge_model, template  # loaded by evaluate() once the models are out
