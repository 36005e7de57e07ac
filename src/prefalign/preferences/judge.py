"""LLM as judge: rank each prompt's candidates with a model and write the implied pairs.

    prefalign judge --input synthetic.candidates.jsonl --output judged.jsonl --judge-model DIR
    prefalign judge --input c.jsonl --output judged.jsonl \\
        --judge-url http://localhost:8000/v1 --judge-model NAME --api-key-env MY_KEY

The judge is a local causal LM (greedy decoding through generation.generate, offline) or
any OpenAI-compatible chat-completions endpoint (POST URL/chat/completions, standard
library HTTP only). The API key is read from the environment variable --api-key-env names
and sent only as the Authorization header: it is never printed, logged or written, and
redirects are refused so it never reaches another host.

Input rows have `prompt` and `candidates`, as `prefalign generate --keep-candidates` writes
them. Identical candidates are shown once. The ranking prompt is a template with the
placeholders {prompt}, {candidates} (numbered 0..N-1) and {n}. An answer such as "2,0,3,1",
"2 > 0 > 3 > 1" or "[2, 0, 3, 1]", also inside prose, counts when it names every candidate
exactly once and is the only such ranking in the answer. Otherwise the item is asked again,
up to --retries more times (sampling at --retry-temperature), then recorded as unjudged with
every raw answer: a ranking is never guessed. A judged item writes every pair its ranking
implies (source "judge:MODEL", rank_chosen/rank_rejected counting from 1 = best), as
annotate does; OUTPUT.judgments.jsonl records each item's status, ranking and raw answers.
Each request is bounded by --timeout seconds in all (connect, send, every read) and by
--max-response-bytes of reply. Network errors, a reply cut short or too slow, 429 and 5xx are
retried with exponential backoff; other HTTP errors, and a connection still refused, stop the
run. A request that still fails, or whose reply is too large or not a chat-completions
response, leaves its item unjudged with the reason (one warning line) and the run goes on;
when every item of a batch fails before any reply was usable, the endpoint is at fault and
the run stops, recording nothing for that batch. Server text in messages has its control
characters escaped, and the key is replaced by [redacted] in whatever is stored or printed;
stored answers are cut to 4000 characters with a marker.
Progress is committed per batch (best_of_n.Journal): the same command continues.

Listwise (the default) shows each item's candidates in an order shuffled per item, seeded by
--seed and the item's key (a rerun asks the same), so no candidate always sits first; the
judgments record it as `shown`. --mode pairwise asks every pair of distinct candidates in
both orders with a template of {prompt}, {a} and {b}, answered "0", "1" or "tie"
(pairwise.py). Verdicts that survive the swap count; a pair whose verdict follows the
position is a flip, recorded as a tie or dropped (--on-inconsistent); ties write no row.
Each row carries `confidence`: a local judge's probability of its verdict token ("0" vs
"1", normalised over the two), an API judge's agreement over --samples repeated asks (none
with one ask), averaged over both orders; --min-confidence keeps only rows at least that
confident. The judgments record each pair's answers, verdicts and confidences and each
item's `flip_rate`; the summary line gives the run's position-flip rate and ties.
`prefalign judge agreement` (judge_agreement.py) compares the pairs with a human's.
"""

from __future__ import annotations

import argparse
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.errors import ConfigError, DataError, PrefalignError
from prefalign.preferences.best_of_n import Journal, check_committed, item_key, sidecar
from prefalign.preferences.http_judge import MAX_RESPONSE_BYTES, HttpJudge, NoAnswer, stored_answer
from prefalign.preferences.pairwise import (
    LABELS,
    PAIRWISE_TEMPLATE,
    pairwise_batch,
    pairwise_rows,
)
from prefalign.text import printable, warn

DEFAULT_TEMPLATE = """\
Rank the {n} candidate responses to the prompt below from best to worst.

Prompt:
{prompt}

Candidates:
{candidates}

Answer with the candidate numbers only, best first, separated by commas (for example \
"1,0"). Use every number from 0 to {n} minus 1 exactly once."""
PLACEHOLDERS = re.compile(r"\{(prompt|candidates|n)\}")
# A run of two or more numbers joined only by separators: "2,0,1", "2 > 0 > 1", "[2, 0, 1]".
_RUN = re.compile(r"\d+(?:(?:\s|[,;>\[\]()]|->|→|≻)+\d+)+")
_LABEL_WORDS = re.compile(r"(?i)\b(?:candidates?|responses?|answers?)\s*#?\s*(?=\d)|#(?=\d)")


# ---- prompts and answers (pure) -----------------------------------------------------------


def render_prompt(template: str, prompt: str | list[dict], candidates: list[str]) -> str:
    """The judge's prompt; one pass, so braces inside the prompt or candidates stay as they are."""
    if not isinstance(prompt, str):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    listing = "\n\n".join(f"[{i}]\n{text}" for i, text in enumerate(candidates))
    values = {"prompt": prompt, "candidates": listing, "n": str(len(candidates))}
    return PLACEHOLDERS.sub(lambda m: values[m.group(1)], template)


def parse_ranking(answer: str, n: int) -> list[int]:
    """The one ranking of 0..n-1 in a judge's answer, best first; ValueError otherwise.

    "Ranking: 2 > 0 > 1" (n=3) -> [2, 0, 1]. Runs of numbers that are not a permutation of
    0..n-1 are ignored (prose may mention numbers); two different permutations are refused
    as ambiguous, and none at all as malformed or partial.
    """
    found: list[list[int]] = []
    # Read as written and with labels dropped ("Candidate 2 > Candidate 0"); dropping them
    # could also join a ranking to a later number, so neither reading alone decides.
    for text in (answer, _LABEL_WORDS.sub("", answer)):
        for run in _RUN.finditer(text):
            numbers = [int(x) for x in re.findall(r"\d+", run.group(0))]
            if sorted(numbers) == list(range(n)) and numbers not in found:
                found.append(numbers)
    if len(found) > 1:
        raise ValueError(f"ambiguous: {len(found)} different rankings in the answer")
    if not found:
        raise ValueError(f"no ranking of all {n} candidates (0-{n - 1}, each once)")
    return found[0]


def load_template(path: str | os.PathLike | None, mode: str = "listwise") -> str:
    if path is None:
        return PAIRWISE_TEMPLATE if mode == "pairwise" else DEFAULT_TEMPLATE
    try:
        template = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"template {path}: cannot read it ({e.strerror or e})") from None
    needed = ("{prompt}", "{a}", "{b}") if mode == "pairwise" else ("{prompt}", "{candidates}")
    missing = [p for p in needed if p not in template]
    if missing:
        raise ConfigError(f"template {path}: no {' or '.join(missing)} placeholder; the judge "
                          "would not see what it ranks")
    return template


# ---- judges -------------------------------------------------------------------------------


class LocalJudge:
    """A causal LM: greedy on the first attempt, sampled at retry_temperature on retries."""

    def __init__(self, path: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 retry_temperature: float = 0.7, seed: int = 0, batch_size: int = 8,
                 chat_template: str | None = None):
        import torch

        from prefalign.models import load_causal_lm, load_tokenizer

        self.name, self.settings = path, {"judge": path, "backend": "local",
                                          "max_new_tokens": max_new_tokens,
                                          "temperature": temperature,
                                          "retry_temperature": retry_temperature, "seed": seed}
        self.tokenizer = load_tokenizer(path, chat_template=chat_template)
        self.model = load_causal_lm(path).to("cuda" if torch.cuda.is_available() else "cpu")
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.retry_temperature, self.seed, self.batch_size = retry_temperature, seed, batch_size

    def __call__(self, texts: list[str], attempt: int) -> list[str]:
        from prefalign.generation import SamplingConfig, generate

        chat = bool(getattr(self.tokenizer, "chat_template", None))
        prompts = [[{"role": "user", "content": t}] if chat else t for t in texts]
        sampling = SamplingConfig(
            max_new_tokens=self.max_new_tokens, seed=self.seed + attempt,
            temperature=self.temperature if attempt == 0 else self.retry_temperature,
            batch_size=self.batch_size)
        return [g.text for g in generate(self.model, self.tokenizer, prompts, sampling,
                                         progress=False)]

    def label_probs(self, texts: list[str], labels: tuple[str, ...] = LABELS
                    ) -> list[list[float]]:
        """Per prompt, the next-token probability of each label's first token, normalised
        over the labels: the judge's confidence in each verdict before it answers."""
        import torch

        from prefalign.generation import render_prompts

        chat = bool(getattr(self.tokenizer, "chat_template", None))
        ids = render_prompts(self.tokenizer, [[{"role": "user", "content": t}] if chat else t
                                              for t in texts])
        label_ids = [self._label_token(label) for label in labels]
        if len(set(label_ids)) < len(label_ids):
            raise PrefalignError(f"judge {self.name}: the labels {', '.join(labels)} start "
                                 "with the same token; their probabilities cannot be told apart")
        device = next(self.model.parameters()).device
        out = []
        with torch.no_grad():  # one prompt at a time: no padding whose side could shift logits
            for prompt in ids:
                logits = self.model(torch.tensor([prompt], device=device)).logits[0, -1]
                out.append(torch.softmax(logits.float()[label_ids], -1).tolist())
        return out

    def _label_token(self, label: str) -> int:
        """The first token of `label` that carries its text: a SentencePiece tokenizer may
        put a lone word-start piece ("▁") in front, which every label would share."""
        ids = self.tokenizer.encode(label, add_special_tokens=False)
        for token in ids:
            if label[0] in self.tokenizer.decode([token]):
                return token
        raise PrefalignError(f"judge {self.name}: the tokenizer has no token for the verdict "
                             f"label {label!r}")


# ---- judging a file -----------------------------------------------------------------------


@dataclass
class JudgeReport:
    output: Path
    judgments: Path
    items: int
    items_done_before: int = 0
    status: Counter = field(default_factory=Counter)
    pairs: int = 0
    mode: str = "listwise"
    ties: int = 0           # pairwise: pairs judged a tie (no row)
    flips: int = 0          # pairwise: pairs whose verdict changed with the order shown
    asked: int = 0          # pairwise: pairs answered in both orders
    dropped: int = 0        # pairwise: flipped pairs left out (--on-inconsistent drop)
    below_confidence: int = 0

    def format(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.status.items())) or "none now"
        line = (f"{self.items} items ({self.items_done_before} done before; {counts}): "
                f"{self.pairs} pairs written to {self.output}; answers in {self.judgments}")
        if self.mode == "pairwise":
            rate = f"{self.flips / self.asked:.3f}" if self.asked else "n/a"
            line += (f"\npairwise, this run: {self.asked} pairs asked in both orders, "
                     f"position-flip rate {rate} ({self.flips} flipped, {self.dropped} of them "
                     f"dropped), {self.ties} ties, {self.below_confidence} under "
                     "--min-confidence")
        return line


def read_items(path: Any) -> list[dict]:
    """Rows with prompt and candidates; DataError naming the row for anything else."""
    from prefalign.data.sources import load_rows

    items = []
    for data, origin in load_rows(path):
        prompt, candidates = data.get("prompt"), data.get("candidates")
        if not (isinstance(prompt, str) and prompt.strip()) and not (
                isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt)):
            raise DataError(f"{origin}: field 'prompt' must be text or {{role, content}} messages")
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise DataError(f"{origin}: field 'candidates' must be a list of strings")
        items.append({"prompt": prompt, "candidates": candidates, "origin": origin,
                      "id": data.get("id")})
    return items


def judge_preferences(input_path: Any, output: str | os.PathLike, judge: Any,
                      template: str = DEFAULT_TEMPLATE, retries: int = 2, batch_size: int = 8,
                      judgments: str | os.PathLike | None = None,
                      progress: bool = True, mode: str = "listwise", seed: int = 0,
                      samples: int = 1, on_inconsistent: str = "tie",
                      min_confidence: float | None = None) -> JudgeReport:
    """Rank every item of `input_path` with `judge(texts, attempt) -> answers` (listwise), or
    ask each pair in both orders (pairwise), and write the pairs and judgments (see the
    module docstring)."""
    from tqdm.auto import tqdm

    if retries < 0 or batch_size < 1:
        raise ConfigError(f"need retries >= 0 and batch_size >= 1, got {retries}, {batch_size}")
    check_mode(judge, mode, samples, on_inconsistent, min_confidence)
    items = read_items(input_path)
    output = Path(output)
    judgments = Path(judgments) if judgments else sidecar(output, ".judgments.jsonl")
    settings = {**judge.settings, "template": template, "retries": retries, "mode": mode,
                "seed": seed}
    if mode == "pairwise":
        settings.update(samples=samples, on_inconsistent=on_inconsistent,
                        min_confidence=min_confidence)
    journal = Journal(Path(str(output) + ".progress.jsonl"),
                      {"pairs": output, "judgments": judgments}, "judge", settings)
    keys = [item_key([it["prompt"], it["candidates"], it["id"]]) for it in items]
    report = JudgeReport(output, judgments, len(items), mode=mode)
    with journal, tqdm(total=len(items), desc="judge", unit="item", disable=not progress,
                       dynamic_ncols=True) as bar:
        done = journal.open()
        check_committed(done, keys, [it["origin"] for it in items], journal.log)
        report.items_done_before = len(done)
        bar.update(len(done))
        todo = [i for i in range(len(items)) if i not in done]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            if mode == "pairwise":
                records = pairwise_batch([items[i] for i in chunk], judge, template, retries,
                                         samples, on_inconsistent)
            else:
                records = judge_batch([items[i] for i in chunk], judge, template, retries,
                                      seed, [keys[i] for i in chunk])
            commits = []
            for index, record in zip(chunk, records):
                if mode == "pairwise":
                    rows = pairwise_rows(items[index], record, judge.name, min_confidence,
                                         report)
                else:
                    rows = pair_rows(items[index], record, judge.name)
                report.status[record["status"]] += 1
                report.pairs += len(rows)
                commits.append((index, keys[index], {"pairs": rows,
                                                     "judgments": [{"index": index, **record}]}))
            journal.commit(commits)
            bar.update(len(chunk))
    return report


def check_mode(judge: Any, mode: str, samples: int, on_inconsistent: str,
               min_confidence: float | None) -> None:
    """Refuse options that would not do what they say with this judge and mode."""
    if mode not in ("listwise", "pairwise"):
        raise ConfigError(f"--mode {mode}: choose listwise or pairwise")
    if on_inconsistent not in ("tie", "drop"):
        raise ConfigError(f"--on-inconsistent {on_inconsistent}: choose tie or drop")
    if samples < 1:
        raise ConfigError(f"--samples {samples}: give 1 or more asks per order")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence {min_confidence}: give a probability in [0, 1]")
    if mode == "listwise" and (samples > 1 or min_confidence is not None):
        raise ConfigError("--samples and --min-confidence need --mode pairwise: a listwise "
                          "ranking has no per-pair confidence")
    local = hasattr(judge, "label_probs")
    if samples > 1 and local:
        raise ConfigError("--samples applies to an API judge (--judge-url); a local judge's "
                          "confidence comes from its verdict tokens' probabilities")
    if samples > 1 and not judge.settings.get("temperature"):
        raise ConfigError(f"--samples {samples} with --temperature 0 would ask the same "
                          "greedy question each time; give --temperature > 0 (e.g. 0.7)")
    if min_confidence is not None and not local and samples < 2:
        raise ConfigError("--min-confidence with an API judge needs --samples K >= 2: its "
                          "confidence is the agreement of K repeated asks")


def judge_batch(items: list[dict], judge: Any, template: str, retries: int,
                seed: int | None = None, keys: list[str] | None = None) -> list[dict]:
    """One judgment record per item; items whose answer does not parse are asked again.

    With a `seed`, candidates are shown in an order shuffled per item (seeded by it and the
    item's key, so a rerun asks the same), so no candidate always sits first; `shown`
    records it. Without, they are shown in input order (evaluate swaps them itself).
    """
    records = []
    for index, item in enumerate(items):
        first: dict[str, int] = {}  # each distinct non-empty text, shown once
        for i, text in enumerate(item["candidates"]):
            if text.strip():
                first.setdefault(text, i)
        ident = {"id": item["id"]} if item["id"] is not None else {}
        shown = sorted(first.values())
        if seed is not None:
            key = (keys[index] if keys else
                   item_key([item["prompt"], item["candidates"], item["id"]]))
            random.Random(f"{seed}:{key}").shuffle(shown)
        records.append({"origin": item["origin"], **ident, "judge": judge.name,
                        "status": "unjudged", "reason": None, "ranking": None,
                        "shown": shown, "answers": [], "errors": []})
        if len(first) < 2:
            records[-1].update(status="skipped", reason="fewer than 2 distinct candidates",
                               errors=["fewer than 2 distinct candidates"])
    pending = [k for k, r in enumerate(records) if r["status"] == "unjudged"]
    for attempt in range(retries + 1):
        if not pending:
            break
        texts = [render_prompt(template, items[k]["prompt"],
                               [items[k]["candidates"][i] for i in records[k]["shown"]])
                 for k in pending]
        answers = list(judge(texts, attempt))
        if len(answers) != len(texts):
            raise PrefalignError(f"judge {judge.name} gave {len(answers)} answers to "
                                 f"{len(texts)} prompts")
        still = []
        for k, answer in zip(pending, answers):
            record = records[k]
            if isinstance(answer, NoAnswer):  # the request failed: asking again would too
                record["errors"].append(str(answer))
                record["reason"] = str(answer)
                warn(f"{printable(str(record['origin']), keep='')}: recorded as unjudged: "
                      f"{printable(answer, keep='')}")
                continue
            record["answers"].append(stored_answer(answer))
            try:
                order = parse_ranking(answer, len(record["shown"]))
            except ValueError as e:
                record["errors"].append(str(e))
                record["reason"] = str(e)
                still.append(k)
                continue
            record["status"], record["ranking"] = "judged", [record["shown"][i] for i in order]
            record["reason"] = None
        pending = still
    return records


def pair_rows(item: dict, record: dict, judge_name: str) -> list[dict]:
    """Every (better, worse) pair of a judged item's ranking, in input candidate indices."""
    ranking = record.get("ranking")
    if record["status"] != "judged" or not ranking:
        return []
    ident = {"id": item["id"]} if item["id"] is not None else {}
    texts, rank = item["candidates"], {c: place for place, c in enumerate(ranking, start=1)}
    return [{"prompt": item["prompt"], "chosen": texts[b], "rejected": texts[w],
             "source": f"judge:{judge_name}", **ident, "rank_chosen": rank[b],
             "rank_rejected": rank[w]}
            for k, b in enumerate(ranking) for w in ranking[k + 1:]]


# ---- command line -------------------------------------------------------------------------

DESCRIPTION = ("Rank each prompt's candidates with a judge model (a local causal LM, or an "
               "OpenAI-compatible endpoint with --judge-url) and write every pair the ranking "
               "implies. Answers that are not a full ranking are asked again, then recorded "
               "as unjudged, never guessed. --mode pairwise asks each pair in both orders and keeps "
               "only verdicts that survive the swap. The same command again continues where "
               "it stopped. Compare with human labels: prefalign judge agreement --help.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefalign.data.chat import add_chat_arguments
    from prefalign.hub import DOWNLOAD_HELP

    add = parser.add_argument
    add("--input", required=True, help="rows with prompt and candidates (generate "
        "--keep-candidates output, annotate input)")
    add("--output", required=True, help="JSONL of preference pairs")
    add("--judge-model", required=True, help="local model directory, or with --judge-url the "
        "model name the endpoint serves")
    add("--allow-download", action="store_true", help=DOWNLOAD_HELP)
    add("--judge-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 "
        "(default: run --judge-model locally)")
    add("--api-key-env", default="OPENAI_API_KEY", help="NAME of the environment variable "
        "holding the API key (never the key itself), sent as a Bearer token (default: "
        "OPENAI_API_KEY; unset: no Authorization header)")
    add("--mode", choices=("listwise", "pairwise"), default="listwise", help="listwise: rank "
        "all candidates at once, shown in a seeded shuffled order; pairwise: ask every pair "
        "in both orders and keep only verdicts that survive the swap (default: listwise)")
    add("--on-inconsistent", choices=("tie", "drop"), default="tie", help="pairwise: a pair "
        "whose verdict flips with the order shown is recorded as a tie, or dropped; neither "
        "writes a row (default: tie)")
    add("--samples", type=int, default=1, help="pairwise, API judge: asks per order; the "
        "confidence is the fraction agreeing with the majority (needs --temperature > 0; "
        "default: 1)")
    add("--min-confidence", type=float, help="pairwise: write only pairs at least this "
        "confident (local judge: verdict token probability; API judge: --samples agreement)")
    add("--template", help="prompt file; listwise: {prompt}, {candidates} (numbered 0..N-1) "
        "and {n}; pairwise: {prompt}, {a}, {b}, answered 0, 1 or tie (default: built-in)")
    add("--retries", type=int, default=2, help="asks after a malformed answer before an item is "
        "recorded as unjudged (default: 2)")
    add("--judgments", help="JSONL of raw answers and statuses (default: OUTPUT.judgments.jsonl)")
    add("--max-new-tokens", type=int, default=64, help="answer length (default: 64)")
    add("--temperature", type=float, default=0.0, help="first ask (default: 0, greedy)")
    add("--retry-temperature", type=float, default=0.7, help="asks after a malformed answer "
        "(default: 0.7)")
    add("--batch-size", type=int, default=8, help="items judged together (default: 8)")
    add("--workers", type=int, default=4, help="concurrent HTTP requests (default: 4)")
    add("--timeout", type=float, default=60.0, help="seconds per HTTP request in all: "
        "connecting, sending and reading the whole reply (default: 60)")
    add("--max-response-bytes", type=int, default=MAX_RESPONSE_BYTES, help="largest reply "
        "read from the endpoint; a larger one leaves its item unjudged (default: 1048576)")
    add("--network-retries", type=int, default=5, help="retries after a network error, 429 or "
        "5xx, with exponential backoff (default: 5)")
    add("--seed", type=int, default=0, help="seed of the listwise candidate order and of "
        "sampled retries of a local judge (default: 0)")
    add_chat_arguments(parser, whose="the local --judge-model's tokenizer", text_rows=False,
                       note="; with a template the ranking prompt is sent as a user turn")


def load_judge(args: argparse.Namespace) -> LocalJudge | HttpJudge:
    chat_template = getattr(args, "chat_template", None)
    if args.judge_url and chat_template:
        raise ConfigError("--chat-template applies to a local --judge-model; a served model "
                          "(--judge-url) renders with the endpoint's own template")
    if args.judge_url:
        return HttpJudge(args.judge_url, args.judge_model, args.api_key_env, args.timeout,
                         args.network_retries, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, retry_temperature=args.retry_temperature,
                         workers=args.workers, max_response_bytes=args.max_response_bytes)
    if not Path(args.judge_model).is_dir():
        raise ConfigError(f"--judge-model {args.judge_model}: no such model directory; for a "
                          "served model also give --judge-url")
    return LocalJudge(args.judge_model, args.max_new_tokens, args.temperature,
                      args.retry_temperature, args.seed, args.batch_size, chat_template)


def run(args: argparse.Namespace) -> int:
    template = load_template(args.template, args.mode)
    report = judge_preferences(args.input, args.output, load_judge(args), template,
                               retries=args.retries, batch_size=args.batch_size,
                               judgments=args.judgments, mode=args.mode, seed=args.seed,
                               samples=args.samples, on_inconsistent=args.on_inconsistent,
                               min_confidence=args.min_confidence)
    for line in report.format().split("\n"):
        print(printable(line, keep=""))  # paths as the user typed them
    return 0
