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
Progress is committed per batch (preferences.journal): the same command continues.

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

The asking itself lives in listwise.py and pairwise.py (retries: asking.py); the judges in
local_judge.py and http_judge.py.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.errors import ConfigError, DataError
from prefalign.preferences.journal import Journal, check_committed, item_key, sidecar
from prefalign.preferences.listwise import DEFAULT_TEMPLATE, judge_batch, pair_rows
from prefalign.preferences.pairwise import PAIRWISE_TEMPLATE, pairwise_batch, pairwise_rows

# ---- prompts ------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Asking:
    """How one run asks its judge, and how the answers become rows and journal commits."""

    judge: Any
    template: str
    retries: int
    mode: str
    seed: int
    samples: int
    on_inconsistent: str
    min_confidence: float | None

    def settings(self) -> dict[str, Any]:
        """What the journal records, so that a continued run must ask the same way."""
        settings = {**self.judge.settings, "template": self.template, "retries": self.retries,
                    "mode": self.mode, "seed": self.seed}
        if self.mode == "pairwise":
            settings.update(samples=self.samples, on_inconsistent=self.on_inconsistent,
                            min_confidence=self.min_confidence)
        return settings

    def commits(self, items: list[dict], keys: list[str], chunk: list[int],
                report: JudgeReport) -> list[tuple[int, str, dict]]:
        """Ask about the items at `chunk`; their journal commits, counted into `report`."""
        batch, name = [items[i] for i in chunk], self.judge.name
        if self.mode == "pairwise":
            records = pairwise_batch(batch, self.judge, self.template, self.retries,
                                     self.samples, self.on_inconsistent)
        else:
            records = judge_batch(batch, self.judge, self.template, self.retries, self.seed,
                                  [keys[i] for i in chunk])
        commits = []
        for index, record in zip(chunk, records):
            if self.mode == "pairwise":
                rows = pairwise_rows(items[index], record, name, self.min_confidence, report)
            else:
                rows = pair_rows(items[index], record, name)
            report.status[record["status"]] += 1
            report.pairs += len(rows)
            commits.append((index, keys[index], {"pairs": rows,
                                                 "judgments": [{"index": index, **record}]}))
        return commits


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
    asking = _Asking(judge, template, retries, mode, seed, samples, on_inconsistent,
                     min_confidence)
    items = read_items(input_path)
    output = Path(output)
    judgments = Path(judgments) if judgments else sidecar(output, ".judgments.jsonl")
    journal = Journal(Path(str(output) + ".progress.jsonl"),
                      {"pairs": output, "judgments": judgments}, "judge", asking.settings())
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
            journal.commit(asking.commits(items, keys, chunk, report))
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
