"""`prefalign evaluate`: sample from several models on the same prompts and compare them.

Every model answers the same prompts with the same SamplingConfig (same seed), so sample
(prompt i, candidate j) of two models differs only through the models: generation.py draws
a row's noise from (seed, i, j) alone. Per model:

  reward/*, win_rate/reward   reward-model scores (mean, median) and the win rate against
                              the baseline model: sample (i, j) against the baseline's
                              sample (i, j), a tie counting 1/2
  score/*, win_rate/score     the same with a scorer (a rule, a function, a reward model)
  win_rate/judge, win_rate/judge_lc, judge/flip_rate, judge/unjudged
                              with a judge (evaluation.pairwise): each sample against the
                              baseline's, both orders asked, a flip counting 1/2; the
                              length-controlled win rate and the position-flip rate
  kl                          KL(model || reference) in nats per response, estimated from
                              the model's own samples: mean over samples of
                              sum_t [log p_model(y_t | .) - log p_ref(y_t | .)], both at
                              temperature 1 (completion_logps). The samples come from the
                              sampling distribution (temperature, top-p), so this is the KL
                              of the model itself only when those are 1; it is what the
                              frontier plots whatever they are, for every model alike.
  length, finished_rate       response tokens (EOS included) and the fraction of responses
                              that ended with EOS or a stop string
  benchmark/accuracy, benchmark/pass_rate
                              prompt rows with a reference answer or a test command
                              (evaluation.benchmark)
  distinct_1, distinct_2      over all responses; self_bleu across prompts (first sample
                              of each prompt), self_bleu_per_prompt among a prompt's samples
                              (n > 1 only); see evaluation.metrics

Intervals. Every mean-like headline number (reward/mean, score/mean, the win rates, the
flip rate, kl) gets a 95% percentile bootstrap interval over prompts (all samples of a
prompt resampled together, `bootstrap` resamples, seeded with the sampling seed; see
evaluation.metrics), in report.json's `intervals` as {"value", "ci95": [lo, hi]}. Tables
show "value ± h" with h half the interval's width (the interval itself can be asymmetric;
report.json has its ends).

Models are loaded one at a time next to the reference, so at most two are in memory; a
local judge is loaded after them. The numbers are computed in evaluation.summary from the
sample rows this module collects; the command's options live in evaluation.command.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from prefalign.errors import ConfigError
from prefalign.evaluation import metrics as M
from prefalign.evaluation.benchmark import Benchmark, prompt_rows
from prefalign.evaluation.summary import METRICS, compute_intervals, compute_metrics
from prefalign.generation import Generation, SamplingConfig, collate_generations, generate
from prefalign.train.output_dir import check_no_overlap


@dataclass
class EvalResult:
    """metrics[model][name] (None where it does not apply), every sample per model (dicts as
    in samples.jsonl), the report.json content and the written files."""

    metrics: dict[str, dict[str, float | None]]
    samples: dict[str, list[dict[str, Any]]]
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    intervals: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def html(self) -> Path:
        return self.paths["html"]


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"evaluate: {message}", file=sys.stderr, flush=True)


def prompt_display(prompt: str | Sequence[dict]) -> str:
    """Readable prompt text for reports: chat messages become 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


@torch.no_grad()
def sequence_logps(model: torch.nn.Module, generations: Sequence[Generation], pad_token_id: int,
                   batch_size: int = 16) -> list[float]:
    """Summed temperature-1 log-probs of each generation's response tokens under `model`."""
    from prefalign.decoding import eval_mode
    from prefalign.logprobs import completion_logps

    device = next(model.parameters()).device
    out: list[float] = []
    with eval_mode(model):
        for start in range(0, len(generations), batch_size):
            batch = collate_generations(generations[start : start + batch_size], pad_token_id)
            result = completion_logps(model, batch["input_ids"].to(device),
                                      batch["attention_mask"].to(device),
                                      batch["completion_mask"].to(device))
            out.extend(result.logps.double().cpu().tolist())
    return out


def _same_vocab(a: Any, b: Any) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def _sample_models(models: Mapping[str, str], prompts: list, ref_path: str,
                   sampling: SamplingConfig, device: str, progress: bool,
                   trust_remote_code: bool, chat: tuple = (None, False)
                   ) -> dict[str, list[dict[str, Any]]]:
    """Generate from every model and attach log-probs under it and under the reference.

    chat: (chat template file, text as chat) for every model's tokenizer (data.chat).
    """
    from prefalign.data.chat import tokens_line
    from prefalign.models import load_causal_lm, load_tokenizer

    ref_model = load_causal_lm(ref_path, trust_remote_code).to(device)
    ref_tok = load_tokenizer(ref_path, trust_remote_code, *chat)
    _say(progress, tokens_line(ref_tok))
    ref_key = Path(ref_path).resolve()
    samples: dict[str, list[dict[str, Any]]] = {}
    for k, (name, path) in enumerate(models.items(), start=1):
        _say(progress, f"[{k}/{len(models)}] {name}: sampling {len(prompts)} prompts x "
             f"{sampling.n} from {path}")
        same = Path(path).resolve() == ref_key
        model = ref_model if same else load_causal_lm(path, trust_remote_code).to(device)
        tokenizer = ref_tok if same else load_tokenizer(path, trust_remote_code, *chat)
        gens = generate(model, tokenizer, prompts, sampling, progress=progress)
        pad = tokenizer.pad_token_id
        rows = 2 * sampling.batch_size
        logps = sequence_logps(model, gens, pad, rows)
        if same:
            ref_logps: list[float | None] = list(logps)  # the same weights: KL exactly 0
        elif _same_vocab(tokenizer, ref_tok):
            ref_logps = sequence_logps(ref_model, gens, pad, rows)
        else:
            _say(progress, f"{name}: its vocabulary differs from the reference's; no KL")
            ref_logps = [None] * len(gens)
        samples[name] = [
            {"prompt_index": g.prompt_index, "candidate": g.candidate, "text": g.text,
             "length": len(g.response_ids), "finished": g.finished,
             "finish_reason": g.finish_reason, "logp": lp, "ref_logp": rl}
            for g, lp, rl in zip(gens, logps, ref_logps)
        ]
        if not same:
            del model
    return samples


@torch.no_grad()
def _attach_scores(samples: dict[str, list[dict]], prompts: list, key: str,
                   score: Callable[..., list[float]], progress: bool,
                   extras: Sequence[Mapping[str, Any]] | None = None) -> None:
    """extras: each prompt row's other fields, passed on as the scorer's columns."""
    for name, rows in samples.items():
        _say(progress, f"{name}: {key} of {len(rows)} responses")
        args: tuple = ()
        if extras is not None:
            from prefalign.scoring import row_columns

            args = (row_columns([{"extra_columns": extras[r["prompt_index"]]} for r in rows]),)
        values = score([prompts[r["prompt_index"]] for r in rows], [r["text"] for r in rows],
                       *args)
        for row, value in zip(rows, values):
            row[key] = float(value)


def _write(report: dict[str, Any], samples: Mapping[str, list[dict]], prompts: list,
           out: Path) -> dict[str, Path]:
    """samples.jsonl (one line per sample, with its model and prompt) and the report files."""
    from prefalign.evaluation.report import write_report

    lines = [json.dumps({"model": name, "prompt": prompt_display(prompts[r["prompt_index"]]),
                         **r}) + "\n" for name, rows in samples.items() for r in rows]
    # One write with the report's files: all of them, or (a full disk) none.
    paths = write_report(report, out, extra={"samples.jsonl": "".join(lines)})
    paths["samples"] = out / "samples.jsonl"
    return paths


def _scorer_name(scorer: Any) -> str | None:
    if scorer is None or isinstance(scorer, str):
        return scorer
    return getattr(scorer, "name", None) or getattr(scorer, "__name__", type(scorer).__name__)


def _resolve_names(models: Mapping[str, str], reference: str | None, baseline: str | None
                   ) -> tuple[str, str, str]:
    """(reference path, reference name or the path, baseline name)."""
    if not models:
        raise ConfigError("evaluate: give at least one model (name -> directory)")
    first = next(iter(models))
    baseline = baseline or first
    if baseline not in models:
        raise ConfigError(f"evaluate: baseline {baseline!r} is not one of the models "
                          f"({', '.join(models)})")
    reference = reference or first
    if reference in models:
        return str(models[reference]), reference, baseline
    if not Path(reference).exists():
        raise ConfigError(f"evaluate: reference {reference!r} is neither a model name "
                          f"({', '.join(models)}) nor an existing directory")
    return str(reference), str(reference), baseline


def evaluate(
    models: Mapping[str, str | Path], prompts: Any, output_dir: str | Path,
    reward_model: str | Path | None = None, scorer: Any = None, reference: str | None = None,
    baseline: str | None = None, sampling: SamplingConfig | None = None,
    runs: Mapping[str, str | Path] | None = None,
    frontier: Mapping[str, Sequence[Sequence]] | None = None, findings: Sequence[str] = (),
    num_examples: int = 3, device: str | None = None, progress: bool = True,
    trust_remote_code: bool = False, chat_template: str | None = None,
    text_as_chat: bool = False, judge: Any = None, judge_template: str | None = None,
    judge_retries: int = 2, bootstrap: int = 1000, judge_max_new_tokens: int = 64,
    benchmark: bool | None = None, benchmark_timeout: float = 10.0,
) -> EvalResult:
    """Sample, score and compare `models` (name -> model or adapter directory); write
    report.json, report.md, report.html, the plots and samples.jsonl to output_dir.

    reward_model: a reward-model directory (metrics reward/*); scorer: a scorer spec,
    Scorer or function (prompts, responses) -> numbers (metrics score/*). reference: a
    model name or a directory (default the first model); baseline: the model win rates are
    measured against (default the first). runs: name -> training output dir (or its
    metrics.jsonl) whose curves the report plots. frontier: extra reward-vs-KL curves,
    label -> [(kl, reward) or (kl, reward, point label)], on the scale of the frontier's
    y axis (the reward model's mean, else the scorer's). findings: lines shown first.
    chat_template, text_as_chat: how every compared model's tokenizer renders the prompts
    (data.chat); the reward model keeps its own tokenizer.
    judge: a local causal-LM directory (loaded after sampling) or a judge object
    (preferences.local_judge.LocalJudge, HttpJudge: judge(texts, attempt) -> answers, with
    .name and .settings): the win_rate/judge* and judge/* metrics (evaluation.pairwise),
    asked with judge_template (a template text as preferences.judge reads; default its
    built-in) and judge_retries; a local judge answers in at most judge_max_new_tokens.
    bootstrap: resamples of the 95% intervals (0: none).
    benchmark: the benchmark/* metrics of prompt rows with an `answer` (or `reference`) or a
    `test` command (evaluation.benchmark); None: answers are checked when rows carry them,
    tests are not run; True: both, and an error when no row has either; False: neither.
    benchmark_timeout: seconds per test command.
    """
    from prefalign.evaluation.report import load_run_curves, normalize_frontier

    models = {str(k): str(v) for k, v in models.items()}
    _check_inputs(models, prompts, output_dir, reward_model, scorer, reference, runs)
    ref_path, ref_name, baseline = _resolve_names(models, reference, baseline)
    _check_numbers(bootstrap, judge_retries, judge)
    prompts, extras = prompt_rows(prompts)
    bench = Benchmark(extras, benchmark, benchmark_timeout)
    if bench or bench.skipped_tests:
        _say(True, bench.line())  # always: it changes what the report holds
    sampling = sampling or SamplingConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Everything that can fail on a typo fails here, before minutes of sampling.
    curves = {name: load_run_curves(path) for name, path in (runs or {}).items()}
    sweeps = normalize_frontier(frontier)
    score = _load_score(scorer, models, chat_template)
    samples = _sample_models(models, prompts, ref_path, sampling, device, progress,
                             trust_remote_code, (chat_template, text_as_chat))
    if reward_model is not None:
        _attach_reward(samples, prompts, str(reward_model), 2 * sampling.batch_size, device,
                       trust_remote_code, progress)
    if score is not None:
        _attach_scores(samples, prompts, "score", score, progress, extras)
    if bench:
        bench.attach(samples, [prompt_display(p) for p in prompts], progress)
    judge_info = None if judge is None else _judge_samples(
        samples, prompts, baseline, judge, judge_template, judge_retries,
        judge_max_new_tokens, sampling.batch_size, progress)
    settings = {
        "models": models, "reference": {"name": ref_name, "path": ref_path},
        "baseline": baseline, "reward_model": None if reward_model is None else str(reward_model),
        "scorer": _scorer_name(scorer), "sampling": asdict(sampling),
        "num_prompts": len(prompts), "device": device, "judge": judge_info,
        "benchmark": bench.settings() if bench else None,
    }
    y = "reward/mean" if reward_model is not None else "score/mean" if scorer is not None else None
    report = _report(samples, prompts, settings, bootstrap, [str(f) for f in findings],
                     {"y": y, "curves": sweeps}, curves, num_examples)
    paths = _write(report, samples, prompts, Path(output_dir))
    _say(progress, f"wrote {paths['html']}")
    return EvalResult(report["metrics"], samples, report, paths, report["intervals"])


def _check_inputs(models: dict[str, str], prompts: Any, output_dir: str | Path,
                  reward_model: str | Path | None, scorer: Any, reference: str | None,
                  runs: Mapping[str, str | Path] | None) -> None:
    # The report's files (samples.jsonl, report.*) must not land in a model, run or input.
    check_no_overlap(output_dir, {
        **{f"--models {k}": v for k, v in models.items()},
        **{f"--runs {k}": v for k, v in (runs or {}).items()},
        "--prompts": prompts, "--reward-model": reward_model,
        "--reference": None if reference in models else reference,  # a name, or a directory
        "--scorer": scorer if isinstance(scorer, str) else None})
    if reward_model is not None:
        from prefalign.models import check_reward_model

        if not Path(reward_model).is_dir():
            raise ConfigError(f"evaluate: reward model {reward_model} is not a directory")
        check_reward_model(reward_model)  # a causal LM here would score with a random head


def _check_numbers(bootstrap: Any, judge_retries: int, judge: Any) -> None:
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(f"evaluate: bootstrap must be a whole number >= 0 (0 = no "
                          f"intervals), got {bootstrap!r}")
    if judge_retries < 0:
        raise ConfigError(f"evaluate: judge retries must be >= 0, got {judge_retries}")
    if isinstance(judge, (str, Path)) and not Path(judge).is_dir():
        raise ConfigError(f"evaluate: judge model {judge} is not a directory; for a served "
                          "model give --judge-url too")


def _load_score(scorer: Any, models: dict[str, str], chat_template: str | None) -> Any:
    """The scorer, seeing prompts rendered by the first model's tokenizer; None without one."""
    if scorer is None:
        return None
    from prefalign.models import load_tokenizer
    from prefalign.scoring import TextPrompts, load_scorer

    return TextPrompts(load_scorer(scorer), load_tokenizer(next(iter(models.values())),
                                                           chat_template=chat_template))


def _attach_reward(samples: dict[str, list[dict]], prompts: list, reward_model: str,
                   batch_size: int, device: str, trust_remote_code: bool,
                   progress: bool) -> None:
    from prefalign.scoring import load_scorer

    # Loaded only now: the policies are out of memory by the time the RM comes in.
    rm = load_scorer(reward_model, batch_size=batch_size, device=device,
                     trust_remote_code=trust_remote_code)
    _attach_scores(samples, prompts, "reward", rm.score, progress)


def _judge_samples(samples: dict[str, list[dict]], prompts: list, baseline: str, judge: Any,
                   template: str | None, retries: int, max_new_tokens: int, batch_size: int,
                   progress: bool) -> dict[str, Any]:
    """Every model's samples judged against the baseline's; the report's judge settings."""
    from prefalign.evaluation.pairwise import judge_against_baseline
    from prefalign.preferences.judge import DEFAULT_TEMPLATE
    from prefalign.preferences.local_judge import LocalJudge

    if isinstance(judge, (str, Path)):
        judge = LocalJudge(str(judge), max_new_tokens=max_new_tokens, batch_size=batch_size)
    _say(progress, f"judging every model against {baseline} with {judge.name}")
    unjudged = judge_against_baseline(samples, baseline, prompts, judge, template, retries,
                                      progress=progress)
    return {**judge.settings, "retries": retries, "unjudged": unjudged,
            "template": template or DEFAULT_TEMPLATE}


def _report(samples: dict[str, list[dict]], prompts: list, settings: dict[str, Any],
            bootstrap: int, findings: list[str], frontier: dict[str, Any],
            curves: dict[str, Any], num_examples: int) -> dict[str, Any]:
    """report.json's content: the settings, metrics with intervals, curves and examples."""
    from prefalign.evaluation.report import example_table

    seed, baseline = settings["sampling"]["seed"], settings["baseline"]
    return {
        "title": "Evaluation report",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "findings": findings,
        "metrics": compute_metrics(samples, baseline),
        "intervals": compute_intervals(samples, baseline, bootstrap, seed),
        "bootstrap": {"resamples": bootstrap, "seed": seed, "level": M.BOOTSTRAP_LEVEL,
                      "unit": "prompt", "plus_minus": "half the width of the interval"},
        "metric_info": {k: {"label": label, "description": d} for k, (label, d) in METRICS.items()},
        "frontier": frontier,
        "runs": curves,
        "examples": example_table(samples, [prompt_display(p) for p in prompts], num_examples),
        "samples_file": "samples.jsonl",
    }
