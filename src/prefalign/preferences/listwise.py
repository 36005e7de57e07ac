"""Listwise judging: one prompt shows all of an item's candidates; the answer ranks them.

The ranking prompt is a template with the placeholders {prompt}, {candidates} (numbered
0..N-1) and {n}. An answer such as "2,0,3,1", "2 > 0 > 3 > 1" or "[2, 0, 3, 1]", also
inside prose, counts when it names every candidate exactly once and is the only such
ranking in the answer; otherwise the item is asked again (asking.py), and a ranking is
never guessed. A judged item gives every pair its ranking implies.
"""

from __future__ import annotations

import random
import re
from typing import Any

from prefalign.preferences.asking import (
    ask_until_parsed,
    distinct_candidates,
    new_record,
    note_no_answer,
)
from prefalign.preferences.http_judge import NoAnswer, stored_answer
from prefalign.preferences.journal import item_key

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



def judge_batch(items: list[dict], judge: Any, template: str, retries: int,
                seed: int | None = None, keys: list[str] | None = None) -> list[dict]:
    """One judgment record per item; items whose answer does not parse are asked again.

    With a `seed`, candidates are shown in an order shuffled per item (seeded by it and the
    item's key, so a rerun asks the same), so no candidate always sits first; `shown`
    records it. Without, they are shown in input order (evaluate swaps them itself).
    """
    records = []
    for index, item in enumerate(items):
        shown = distinct_candidates(item["candidates"])
        if seed is not None:
            key = (keys[index] if keys else
                   item_key([item["prompt"], item["candidates"], item["id"]]))
            random.Random(f"{seed}:{key}").shuffle(shown)
        records.append(new_record(item, judge.name, status="unjudged", reason=None,
                                  ranking=None, shown=shown, answers=[], errors=[]))

    def take(k: int, answer: str) -> bool:
        record = records[k]
        if isinstance(answer, NoAnswer):  # the request failed: asking again would too
            note_no_answer(record, answer, "recorded as unjudged")
            record["reason"] = str(answer)
            return False
        record["answers"].append(stored_answer(answer))
        try:
            order = parse_ranking(answer, len(record["shown"]))
        except ValueError as e:
            record["errors"].append(str(e))
            record["reason"] = str(e)
            return True
        record["status"], record["ranking"] = "judged", [record["shown"][i] for i in order]
        record["reason"] = None
        return False

    asks = [(k, render_prompt(template, items[k]["prompt"],
                              [items[k]["candidates"][i] for i in record["shown"]]))
            for k, record in enumerate(records) if record["status"] == "unjudged"]
    ask_until_parsed(judge, asks, retries, take)
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
