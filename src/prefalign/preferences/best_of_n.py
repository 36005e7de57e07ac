"""Best-of-N preference pairs: sample N candidates per prompt, score them, pair the ends.

    prefalign generate --model runs/sft/final --data prompts.jsonl --scorer runs/rm/final \\
        --num-candidates 4 --output synthetic.jsonl

For each prompt, N candidates are sampled (generation.generate's per-row seeds), scored by
a scorer spec (scoring.spec) and sorted by score, best first. Pairing:
  extremes  best vs worst, 2nd best vs 2nd worst, ...: N // 2 pairs, no candidate used twice
  all       every pair whose score gap is at least min_gap
A pair is left out, and counted, when its texts are identical, its scores tie, its gap is
below min_gap, or it repeats a pair already taken; empty candidates are never paired.
Rows: {prompt, chosen, rejected, source ("best_of_n:<scorer>"), score_chosen,
score_rejected, model, temperature, top_p, max_new_tokens, seed, num_candidates, top_k
and stop_strings when set, id?}, which load_preferences reads as they are. keep_candidates
also writes every candidate to OUTPUT.candidates.jsonl (OUTPUT without .jsonl): {prompt,
candidates, scores, finished, prompt_index, id?}, the input of `prefalign annotate` and
`prefalign judge`.

Resuming. Candidate j of prompt i is drawn from the seed of row (i, j), so it does not
depend on the batch size or on which prompts are still to do. Outputs are written through
a Journal (preferences.journal): a run stopped at any moment (Ctrl-C, a crash, a failing
scorer) continues with the same command, without duplicating or losing rows.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prefalign.config import option, require
from prefalign.data.chat import ChatOptions
from prefalign.errors import ConfigError
from prefalign.generation import SamplingConfig, SamplingOptions
from prefalign.hub import DownloadOption
from prefalign.preferences.journal import Journal, check_committed, item_key, sidecar
from prefalign.scoring import SCORER_HELP

PAIRINGS = ("extremes", "all")
SKIP_REASONS = ("identical text", "tied score", "gap below min_gap", "duplicate pair")


# ---- pairing (pure) -----------------------------------------------------------------------


def select_pairs(texts: list[str], scores: list[float], pairing: str = "extremes",
                 min_gap: float = 0.0) -> tuple[list[tuple[int, int]], Counter]:
    """(better, worse) candidate indices and a Counter of left-out pairs by reason.

    Candidates are sorted by score, best first (ties keep their order); empty texts are
    never paired. texts ["a", "bb", "c", "d"], scores [0.1, 0.9, 0.5, 0.3], "extremes" ->
    order [1, 2, 3, 0] -> [(1, 0), (2, 3)].
    """
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing {pairing!r}: use one of {', '.join(PAIRINGS)}")
    order = sorted((i for i, t in enumerate(texts) if t.strip()), key=lambda i: -scores[i])
    if pairing == "extremes":
        wanted = [(order[k], order[-1 - k]) for k in range(len(order) // 2)]
    else:
        wanted = [(b, w) for k, b in enumerate(order) for w in order[k + 1:]]
    pairs, skipped, seen = [], Counter(), set()
    for better, worse in wanted:
        gap = scores[better] - scores[worse]
        reason = ("identical text" if texts[better] == texts[worse] else "tied score" if gap == 0
                  else "gap below min_gap" if gap < min_gap
                  else "duplicate pair" if (texts[better], texts[worse]) in seen else None)
        if reason:
            skipped[reason] += 1
            continue
        seen.add((texts[better], texts[worse]))
        pairs.append((better, worse))
    return pairs, skipped


# ---- generation ---------------------------------------------------------------------------


@dataclass
class BestOfNReport:
    """What a generate run did; `prompts_done_before` were committed by an earlier run."""

    output: Path
    prompts: int
    prompts_done_before: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)
    candidates: Path | None = None

    def format(self) -> str:
        now = self.prompts - self.prompts_done_before
        text = (f"{self.prompts} prompts ({now} generated now, {self.prompts_done_before} "
                f"before): {self.pairs} pairs written to {self.output}")
        if self.skipped:
            text += "; left out: " + ", ".join(f"{k} {v}" for k, v in self.skipped.most_common())
        return text + (f"; candidates in {self.candidates}" if self.candidates else "")


def sample_candidates(model: torch.nn.Module, tokenizer: Any, prompts: list[Any],
                      indices: list[int], sampling: Any) -> list[list[Any]]:
    """sampling.n Generations per prompt, prompt k keyed as index indices[k] of the whole set,
    so the candidates of prompt i are the same in every run, however a restart slices it."""
    from prefalign.generation import generate

    gens = generate(model, tokenizer, prompts, sampling, progress=False, seed_indices=indices)
    return [gens[k * sampling.n:(k + 1) * sampling.n] for k in range(len(prompts))]


def scorer_prompt(tokenizer: Any, prompt: str | list[dict]) -> str:
    """What a scorer sees of a prompt: the text, or chat messages rendered by the template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _model_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        from prefalign.models import model_reference

        return model_reference(str(model))
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def generate_preferences(
    model: Any, data: Any, output: str | os.PathLike, scorer: Any, num_candidates: int = 4,
    sampling: SamplingOptions | None = None, seed: int = 0, batch_size: int = 8,
    pairing: str = "extremes", min_gap: float = 0.0, keep_candidates: bool = False,
    source: str | None = None, tokenizer: Any = None, progress: bool = True,
    candidate_fields: Callable[[list[Any]], list[dict]] | None = None,
    chat_template: str | None = None, text_as_chat: bool = False,
) -> BestOfNReport:
    """Write best-of-N preference pairs for every prompt of `data` (see the module docstring).

    model: a model directory (or adapter directory), or a loaded model with `tokenizer`.
    scorer: a scorer spec, a Scorer or a function (scoring.load_scorer). sampling: how
    candidates are sampled (a config composing SamplingOptions will do; default its
    defaults), num_candidates per prompt with `seed`, batch_size prompts at a time.
    candidate_fields(generations of one batch, prompt-major): one dict per prompt, added
    to its candidates row (iterate uses it to record log-probs of the samples).
    chat_template, text_as_chat: how the tokenizer of a model directory renders the prompts
    (data.chat); a loaded model's tokenizer is used as it is.
    """
    from prefalign.data.prompts import load_prompts
    from prefalign.scoring import load_scorer

    if num_candidates < 2:
        raise ConfigError(f"num_candidates must be >= 2 to make pairs, got {num_candidates}")
    if min_gap < 0:
        raise ConfigError(f"min_gap must be >= 0, got {min_gap}")
    select_pairs([], [], pairing)  # the pairing name is checked before any work
    sampling = SamplingConfig.of(sampling or SamplingOptions(), seed=seed, n=num_candidates,
                                 batch_size=batch_size)
    prompts, score = load_prompts(data), load_scorer(scorer)
    pairs = _PairRows(_settings(model, sampling), source or f"best_of_n:{score.name}",
                      pairing, min_gap)
    journal = _journal(Path(output), keep_candidates, pairs, score.name)
    keys = [item_key([p["prompt"], p.get("id")]) for p in prompts]
    report = BestOfNReport(Path(output), len(prompts),
                           candidates=journal.files.get("candidates"))
    with journal:
        done = journal.open()
        check_committed(done, keys, [p["origin"] for p in prompts], journal.log)
        report.prompts_done_before = len(done)
        todo = [i for i in range(len(prompts)) if i not in done]
        if not todo:
            return report
        model, tokenizer = _policy(model, tokenizer, chat_template, text_as_chat, progress)
        with tqdm(total=len(prompts), initial=len(done), desc="best-of-n", unit="prompt",
                  disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                items = [prompts[i] for i in chunk]
                scored = _sample_and_score(model, tokenizer, items, chunk, sampling, score,
                                           candidate_fields)
                commits = []
                for index, item, candidates in zip(chunk, items, scored):
                    rows = pairs.rows(item, index, *candidates, report.skipped)
                    report.pairs += len(rows["pairs"])
                    commits.append((index, keys[index], rows))
                journal.commit(commits)
                bar.update(len(chunk))
                bar.set_postfix(pairs=report.pairs)
    return report


def _journal(output: Path, keep_candidates: bool, pairs: _PairRows, scorer: str) -> Journal:
    """The pairs file (and the candidates file) with the settings a continued run must keep."""
    files = {"pairs": output, **({"candidates": sidecar(output, ".candidates.jsonl")}
                                 if keep_candidates else {})}
    return Journal(Path(str(output) + ".progress.jsonl"), files, "best-of-n",
                   {**pairs.settings, "scorer": scorer, "pairing": pairs.pairing,
                    "min_gap": pairs.min_gap, "source": pairs.source,
                    "keep_candidates": keep_candidates})


def _settings(model: Any, sampling: SamplingConfig) -> dict[str, Any]:
    """What every pair row records of how it was made; top_k and stop strings when used, so
    an output started before they were options continues with the same settings."""
    extra = {"top_k": sampling.top_k} if sampling.top_k is not None else {}
    extra.update({"stop_strings": sampling.stop_strings} if sampling.stop_strings else {})
    return {"model": _model_name(model), "temperature": sampling.temperature,
            "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens,
            "seed": sampling.seed, "num_candidates": sampling.n, **extra}


def _policy(model: Any, tokenizer: Any, chat_template: str | None, text_as_chat: bool,
            progress: bool) -> tuple[Any, Any]:
    """(model, tokenizer): a model directory loaded onto the GPU if there is one."""
    if not isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            raise ConfigError("generate_preferences: a loaded model needs its tokenizer")
        return model, tokenizer
    from prefalign.models import load_causal_lm, load_tokenizer

    tokenizer = tokenizer or load_tokenizer(str(model), chat_template=chat_template,
                                            text_as_chat=text_as_chat)
    if progress:
        from prefalign.data.chat import tokens_line

        print(tokens_line(tokenizer), flush=True)
    policy = load_causal_lm(str(model))
    return policy.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def _sample_and_score(model: Any, tokenizer: Any, items: list[dict], indices: list[int],
                      sampling: SamplingConfig, score: Any,
                      candidate_fields: Callable[[list[Any]], list[dict]] | None,
                      ) -> list[tuple[list[str], list[float], list[Any], dict]]:
    """Per prompt of the batch: (candidate texts, their scores, Generations, extra fields)."""
    from prefalign.scoring import row_columns

    groups = sample_candidates(model, tokenizer, [p["prompt"] for p in items], indices,
                               sampling)
    texts = [[g.text for g in group] for group in groups]
    repeated = [p for p in items for _ in range(sampling.n)]
    flat = score([scorer_prompt(tokenizer, p["prompt"]) for p in repeated],
                 [t for ts in texts for t in ts], row_columns(repeated))
    extra = candidate_fields([g for gs in groups for g in gs]) if candidate_fields \
        else [{}] * len(items)
    n = sampling.n
    return [(texts[k], flat[k * n:(k + 1) * n], groups[k], extra[k]) for k in range(len(items))]


@dataclass
class _PairRows:
    """The rows of one prompt: its pairs (with how they were made) and its candidates."""

    settings: dict[str, Any]
    source: str
    pairing: str
    min_gap: float

    def rows(self, item: dict, index: int, texts: list[str], scores: list[float],
             gens: list[Any], extra: dict, skipped: Counter) -> dict[str, list[dict]]:
        pairs, left_out = select_pairs(texts, scores, self.pairing, self.min_gap)
        skipped.update(left_out)
        ident = {"id": item["id"]} if item.get("id") is not None else {}
        rows = [{"prompt": item["prompt"], "chosen": texts[b], "rejected": texts[w],
                 "source": self.source, "score_chosen": scores[b], "score_rejected": scores[w],
                 **self.settings, **ident} for b, w in pairs]
        candidates = {"prompt": item["prompt"], "candidates": texts, "scores": scores,
                      "finished": [g.finished for g in gens], "prompt_index": index, **ident,
                      **extra}
        return {"pairs": rows, "candidates": [candidates]}


# ---- command line -------------------------------------------------------------------------

DESCRIPTION = ("Sample N candidates per prompt, score them with a scorer or reward model and "
               "write best-vs-worst preference pairs. Progress is committed after every batch "
               "of prompts; the same command again continues where it stopped.")


@dataclass(frozen=True)
class GenerateConfig(SamplingOptions, ChatOptions, DownloadOption):
    SECTION = ""
    COMMAND = "generate"

    model: str = option("", "policy to sample from: model or adapter directory")
    data: str = option("", "prompts: rows with prompt or messages (or preference rows)")
    scorer: str = option("", SCORER_HELP)
    output: str = option("", "JSONL of preference pairs")
    num_candidates: int = option(4, "candidates per prompt")
    seed: int = option(0, "sampling seed")
    batch_size: int = option(8, "prompts per forward batch")
    pairing: str = option("extremes", "extremes: best vs worst, 2nd vs 2nd worst, ...; all: "
                          "every pair whose score gap is at least --min-gap", choices=PAIRINGS)
    min_gap: float = option(0.0, "smallest score gap of a pair")
    source: str | None = option(None, "source column of the pairs (none = best_of_n:SCORER)")
    keep_candidates: bool = option(False, "also write every candidate and score to "
                                   "OUTPUT.candidates.jsonl (the input of prefalign annotate "
                                   "and prefalign judge)")

    def validate(self) -> None:
        for key in ("model", "data", "scorer", "output"):
            require(bool(getattr(self, key)), key, f"is required (--{key} ...)")
        require(self.num_candidates >= 2, "num_candidates", "must be >= 2 to make pairs")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.min_gap >= 0, "min_gap", "must be >= 0")
        super().validate()


def run(config: GenerateConfig) -> int:
    """`prefalign generate`: write the pairs and print what was done."""
    report = generate_preferences(
        config.model, config.data, config.output, config.scorer, config.num_candidates,
        sampling=config, seed=config.seed, batch_size=config.batch_size,
        pairing=config.pairing, min_gap=config.min_gap, keep_candidates=config.keep_candidates,
        source=config.source, chat_template=config.chat_template,
        text_as_chat=config.text_as_chat)
    print(report.format())
    return 0
