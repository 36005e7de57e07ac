"""`prefalign judge`: its config (options, YAML keys, checks) and the run from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefalign.config import option, option_like, require
from prefalign.data.chat import ChatTemplateOption
from prefalign.errors import ConfigError
from prefalign.generation import SamplingOptions, check_sampling
from prefalign.hub import DownloadOption
from prefalign.preferences.http_judge import MAX_RESPONSE_BYTES, HttpJudge
from prefalign.preferences.judge import judge_preferences, load_template
from prefalign.preferences.local_judge import LocalJudge
from prefalign.text import printable

DESCRIPTION = ("Rank each prompt's candidates with a judge model (a local causal LM, or an "
               "OpenAI-compatible endpoint with --judge-url) and write every pair the ranking "
               "implies. Answers that are not a full ranking are asked again, then recorded "
               "as unjudged, never guessed. --mode pairwise asks each pair in both orders and "
               "keeps only verdicts that survive the swap. The same command again continues "
               "where it stopped. A chat template applies to a local judge: the ranking "
               "prompt is then sent as a user turn. Compare with human labels: prefalign "
               "judge agreement --help.")


@dataclass(frozen=True)
class JudgeConfig(ChatTemplateOption, DownloadOption):
    SECTION = ""
    COMMAND = "judge"

    input: str = option("", "rows with prompt and candidates (generate --keep-candidates "
                        "output, annotate input)")
    output: str = option("", "JSONL of preference pairs")
    judge_model: str = option("", "local model directory, or with --judge-url the model name "
                              "the endpoint serves")
    judge_url: str | None = option(None, "OpenAI-compatible base URL, e.g. "
                                   "http://localhost:8000/v1 (none = run --judge-model locally)")
    api_key_env: str = option("OPENAI_API_KEY", "NAME of the environment variable holding the "
                              "API key (never the key itself), sent as a Bearer token (unset: "
                              "no Authorization header)")
    mode: str = option("listwise", "listwise: rank all candidates at once, shown in a seeded "
                       "shuffled order; pairwise: ask every pair in both orders and keep only "
                       "verdicts that survive the swap", choices=("listwise", "pairwise"))
    on_inconsistent: str = option("tie", "pairwise: a pair whose verdict flips with the order "
                                  "shown is recorded as a tie, or dropped; neither writes a "
                                  "row", choices=("tie", "drop"))
    samples: int = option(1, "pairwise, API judge: asks per order; the confidence is the "
                          "fraction agreeing with the majority (needs --temperature > 0)")
    min_confidence: float | None = option(None, "pairwise: write only pairs at least this "
                                          "confident (local judge: verdict token probability; "
                                          "API judge: --samples agreement)")
    template: str | None = option(None, "prompt file; listwise: {prompt}, {candidates} "
                                  "(numbered 0..N-1) and {n}; pairwise: {prompt}, {a}, {b}, "
                                  "answered 0, 1 or tie (none = built-in)")
    retries: int = option(2, "asks after a malformed answer before an item is recorded as "
                          "unjudged")
    judgments: str | None = option(None, "JSONL of raw answers and statuses (none = "
                                   "OUTPUT.judgments.jsonl)")
    # The judge's answers are sampled like any response, greedily at first.
    max_new_tokens: int = option_like(SamplingOptions, "max_new_tokens", 64, "answer length")
    temperature: float = option_like(SamplingOptions, "temperature", 0.0,
                                     "first ask; 0 = greedy")
    retry_temperature: float = option(0.7, "asks after a malformed answer")
    batch_size: int = option(8, "items judged together")
    workers: int = option(4, "concurrent HTTP requests")
    timeout: float = option(60.0, "seconds per HTTP request in all: connecting, sending and "
                            "reading the whole reply")
    max_response_bytes: int = option(MAX_RESPONSE_BYTES, "largest reply read from the "
                                     "endpoint; a larger one leaves its item unjudged")
    network_retries: int = option(5, "retries after a network error, 429 or 5xx, with "
                                  "exponential backoff")
    seed: int = option(0, "seed of the listwise candidate order and of sampled retries of a "
                       "local judge")

    def validate(self) -> None:
        for key in ("input", "output", "judge_model"):
            require(bool(getattr(self, key)), key, f"is required (--{key.replace('_', '-')} ...)")
        require(not (self.judge_url and self.chat_template), "chat_template",
                "applies to a local --judge-model; a served model (--judge-url) renders with "
                "the endpoint's own template")
        check_sampling(self)
        require(self.retry_temperature >= 0, "retry_temperature", "must be >= 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        super().validate()


def load_judge(config: JudgeConfig) -> LocalJudge | HttpJudge:
    """The judge `config` names: served (judge_url) or a local model directory."""
    if config.judge_url:
        return HttpJudge(config.judge_url, config.judge_model, config.api_key_env,
                         config.timeout, config.network_retries,
                         max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                         retry_temperature=config.retry_temperature, workers=config.workers,
                         max_response_bytes=config.max_response_bytes)
    if not Path(config.judge_model).is_dir():
        raise ConfigError(f"--judge-model {config.judge_model}: no such model directory; for "
                          "a served model also give --judge-url")
    return LocalJudge(config.judge_model, config.max_new_tokens, config.temperature,
                      config.retry_temperature, config.seed, config.batch_size,
                      config.chat_template)


def run(config: JudgeConfig) -> int:
    """`prefalign judge`: write the pairs and print the report."""
    template = load_template(config.template, config.mode)
    report = judge_preferences(config.input, config.output, load_judge(config), template,
                               retries=config.retries, batch_size=config.batch_size,
                               judgments=config.judgments, mode=config.mode, seed=config.seed,
                               samples=config.samples, on_inconsistent=config.on_inconsistent,
                               min_confidence=config.min_confidence)
    for line in report.format().split("\n"):
        print(printable(line, keep=""))  # paths as the user typed them
    return 0
