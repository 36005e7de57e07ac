"""`prefalign evaluate`: its options and the run from parsed arguments."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefalign.errors import ConfigError
from prefalign.evaluation.evaluate import evaluate
from prefalign.generation import SamplingConfig

DESCRIPTION = ("Sample from several models on the same prompts with the same seeded settings, "
               "score the responses (reward model and/or scorer), compare rewards, win rates "
               "against a baseline, KL to a reference, diversity, length and EOS rate, and "
               "write report.json, report.md and a self-contained report.html.")


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


def add_arguments(parser: Any) -> None:
    from prefalign.data.chat import add_chat_arguments

    add = parser.add_argument
    add("--models", nargs="+", required=True, metavar="NAME=DIR",
        help="models to compare, in table order: model or adapter directories")
    add("--prompts", required=True, help="prompt file (JSONL, JSON, Parquet, CSV, datasets dir)")
    add("--reward-model", help="reward-model directory: reward/* metrics and RM win rates")
    add("--scorer", help="scorer spec (e.g. \"length(max=200)\", module:function, a reward-model "
        "directory): score/* metrics and scorer win rates")
    add("--baseline", help="model that win rates are measured against (default: the first)")
    add("--reference", help="model name or directory for the KL (default: the first model)")
    add("--runs", nargs="*", default=[], metavar="NAME=DIR",
        help="training runs whose metrics.jsonl curves the report plots")
    add("--output-dir", default="eval-report", help="where reports go (default: eval-report)")
    add("--max-new-tokens", type=int, default=128, help="default: 128")
    add("--temperature", type=float, default=1.0, help="default: 1.0 (0 = greedy)")
    add("--top-p", type=float, default=1.0, help="default: 1.0")
    add("--num-samples", type=int, default=1, help="responses per prompt (default: 1)")
    add("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8)")
    add("--seed", type=int, default=0, help="sampling seed, the same for every model (default: 0)")
    add("--num-examples", type=int, default=3,
        help="prompts shown with every model's response side by side (default: 3)")
    add("--bootstrap", type=int, default=1000, metavar="N",
        help="resamples of the 95%% bootstrap intervals over prompts shown as value ± half "
        "width on the reward, score, win-rate and KL numbers (default: 1000; 0: none)")
    add("--judge-model", metavar="DIR|NAME", help="pairwise judge against --baseline: a local "
        "causal-LM directory, or with --judge-url the model name the endpoint serves. Each "
        "pair is asked in both orders; a verdict that flips counts 1/2. Adds win rate "
        "(judge), a length-controlled win rate and the position-flip rate")
    add("--judge-url", help="OpenAI-compatible base URL of the judge, e.g. "
        "http://localhost:8000/v1")
    add("--api-key-env", default="OPENAI_API_KEY", help="NAME of the environment variable "
        "holding the judge endpoint's API key (never the key itself; default: OPENAI_API_KEY; "
        "unset: no Authorization header)")
    add("--judge-template", help="judge prompt file with {prompt} and {candidates} (as "
        "`prefalign judge --template`; default: the built-in ranking prompt)")
    add("--judge-retries", type=int, default=2, help="asks after an unparsable answer before "
        "a pair is counted as unjudged (default: 2)")
    add("--judge-max-new-tokens", type=int, default=64, help="judge answer length (default: 64)")
    add("--judge-timeout", type=float, default=60.0, help="seconds per judge HTTP request in "
        "all (default: 60)")
    add("--benchmark", action=argparse.BooleanOptionalAction, default=None,
        help="benchmark/accuracy and benchmark/pass_rate from --prompts rows with an `answer` "
        "(or `reference`: the response's last \\boxed{} or number, else its last line, "
        "must match) or a `test` command (run on the response's extracted code like the "
        "command scorer, {file} and {dir} filled in; exit 0 passes). Default: answers are "
        "checked when rows carry them and test commands are not run; --benchmark runs them "
        "too (they EXECUTE MODEL-WRITTEN CODE: use a container without network); "
        "--no-benchmark: neither")
    add("--benchmark-timeout", type=float, default=10.0, metavar="SECONDS",
        help="limit per test command (default: 10)")
    add("--finding", action="append", default=[], metavar="TEXT",
        help="a line shown at the top of the report (repeatable)")
    add("--frontier", metavar="JSON", help="file of extra reward-vs-KL curves: "
        "{\"label\": [[kl, reward], [kl, reward, \"point label\"], ...]}")
    from prefalign.hub import DOWNLOAD_HELP

    add("--device", help="cuda or cpu (default: cuda when available)")
    add("--trust-remote-code", action="store_true",
        help="allow model code from the model directories to run")
    add("--allow-download", action="store_true", help=DOWNLOAD_HELP)
    add_chat_arguments(parser, whose="every compared model's tokenizer",
                       note="; the reward model keeps its own")


def run_evaluate(args: Any) -> Path:
    """`prefalign evaluate` from parsed arguments (add_arguments'); prints and returns the
    path of report.html."""
    frontier = None
    if getattr(args, "frontier", None):
        try:
            frontier = json.loads(Path(args.frontier).read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--frontier {args.frontier}: {exc}") from None
    judge, template = _judge_from_args(args)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, n=args.num_samples,
                              batch_size=args.batch_size)
    result = evaluate(
        parse_named(args.models, "--models"), args.prompts, args.output_dir,
        reward_model=args.reward_model, scorer=args.scorer, reference=args.reference,
        baseline=args.baseline, sampling=sampling, runs=parse_named(args.runs, "--runs"),
        frontier=frontier, findings=args.finding, num_examples=args.num_examples,
        device=args.device, trust_remote_code=args.trust_remote_code,
        chat_template=args.chat_template, text_as_chat=args.text_as_chat,
        judge=judge, judge_template=template, judge_retries=args.judge_retries,
        bootstrap=args.bootstrap, judge_max_new_tokens=args.judge_max_new_tokens,
        benchmark=getattr(args, "benchmark", None),
        benchmark_timeout=getattr(args, "benchmark_timeout", 10.0))
    print(result.html)
    return result.html


def _judge_from_args(args: Any) -> tuple[Any, str | None]:
    """(judge or None, template text or None); every judge flag is checked before sampling."""
    from prefalign.preferences.judge import load_template

    url, model = getattr(args, "judge_url", None), getattr(args, "judge_model", None)
    if url and not model:
        raise ConfigError("--judge-url: give --judge-model NAME too (the model the endpoint "
                          "serves)")
    if not model:
        if getattr(args, "judge_template", None):
            raise ConfigError("--judge-template: give --judge-model (and --judge-url for a "
                              "served judge) too")
        return None, None
    template = load_template(args.judge_template) if args.judge_template else None
    if args.judge_max_new_tokens < 1:
        raise ConfigError(f"--judge-max-new-tokens must be >= 1, got {args.judge_max_new_tokens}")
    if url:
        from prefalign.preferences.http_judge import HttpJudge

        return HttpJudge(url, model, args.api_key_env, args.judge_timeout,
                         max_new_tokens=args.judge_max_new_tokens), template
    if not Path(model).is_dir():
        raise ConfigError(f"--judge-model {model}: no such model directory; for a served "
                          "model also give --judge-url")
    return model, template  # loaded by evaluate() once the compared models are out of memory
