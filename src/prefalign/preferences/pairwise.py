"""Pairwise judging, asked in both orders: prompts, answers, verdicts, and the asking.

A judge that favours whichever answer it reads first agrees with itself only when the two
answers are shown once each way round. Every pair (i, j) of an item's candidates is asked as
(i, j) and as (j, i); the answer names a position ("0" first, "1" second) or "tie". The two
verdicts, turned back into candidates, are compared: when both name the same candidate (or
both say tie) that is the verdict; when they differ the judge's position, not the answers,
decided, and the pair is a position flip (recorded as a tie, or left out).

Confidence of one ask is the probability the judge gave the verdict it chose: a local
judge's mass on the chosen label's first token, normalised over the two labels; an API
judge's fraction of --samples repeated asks that agree with the majority. A pair's
confidence is the mean of its two orders'.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations
from typing import Any

from prefalign.preferences.asking import (
    ask_until_parsed,
    distinct_candidates,
    new_record,
    note_no_answer,
)
from prefalign.preferences.http_judge import NoAnswer, stored_answer

PAIRWISE_TEMPLATE = """\
Which of the two responses to the prompt below is better?

Prompt:
{prompt}

Response 0:
{a}

Response 1:
{b}

Answer with the better response's number only, 0 or 1, or with "tie" if neither is better."""
PAIR_PLACEHOLDERS = re.compile(r"\{(prompt|a|b)\}")
LABELS = ("0", "1")
_CHOICE = re.compile(r"(?i)(?<!\w)(?<!\d\.)(0|1|tie)(?!\w)(?!\.\d)")  # not in 1.5 or 10
TIE = "tie"


def render_pair(template: str, prompt: str | list[dict], first: str, second: str) -> str:
    """The pairwise prompt; one pass, so braces inside the texts stay as they are."""
    if not isinstance(prompt, str):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    values = {"prompt": prompt, "a": first, "b": second}
    return PAIR_PLACEHOLDERS.sub(lambda m: values[m.group(1)], template)


def parse_choice(answer: str) -> int | str:
    """0 (first shown), 1 (second shown) or "tie"; ValueError unless exactly one is named.

    "1" -> 1, "Response 0 is better." -> 0, "Tie." -> "tie"; "0 or 1" is ambiguous.
    """
    found = {m.group(1).lower() for m in _CHOICE.finditer(answer)}
    if len(found) != 1:
        raise ValueError("ambiguous: names both responses" if len(found) > 1 else
                         "no verdict (0, 1 or tie)")
    word = found.pop()
    return TIE if word == TIE else int(word)


def majority(choices: list[int | str]) -> tuple[int | str, float]:
    """The most frequent choice of repeated asks and the fraction that agree with it; a tie
    between different choices is a "tie" verdict (no side is preferred)."""
    counts = Counter(choices).most_common()
    top, n = counts[0]
    if len(counts) > 1 and counts[1][1] == n:
        return TIE, n / len(choices)
    return top, n / len(choices)


def combine(i: int, j: int, forward: tuple[Any, float | None],
            backward: tuple[Any, float | None]) -> dict:
    """The verdict of pair (i, j) from its asks in both orders.

    forward: (choice, confidence) asked as (i, j); backward: asked as (j, i). A choice is 0,
    1, "tie" or None (no usable answer). Returns {"verdict": i, j, "tie" or None,
    "consistent": bool or None (None: an order had no answer), "confidence"}.
    """
    (cf, pf), (cb, pb) = forward, backward
    if cf is None or cb is None:
        return {"verdict": None, "consistent": None, "confidence": None}
    first = TIE if cf == TIE else (i, j)[cf]
    second = TIE if cb == TIE else (j, i)[cb]
    if first != second:
        return {"verdict": None, "consistent": False, "confidence": None}
    confidence = None if pf is None or pb is None else (pf + pb) / 2
    return {"verdict": first, "consistent": True, "confidence": confidence}


def flip_rate(pairs: list[dict]) -> float | None:
    """Share of pairs, of those answered in both orders, whose two verdicts disagree."""
    asked = [p for p in pairs if p["consistent"] is not None]
    return sum(not p["consistent"] for p in asked) / len(asked) if asked else None


# ---- asking a judge ---------------------------------------------------------------------


def pairwise_batch(items: list[dict], judge: Any, template: str, retries: int,
                   samples: int = 1, on_inconsistent: str = "tie") -> list[dict]:
    """One record per item: every pair of distinct candidates asked in both orders, each
    order `samples` times; a malformed answer is asked again (module docstring)."""
    records, asks = [], []  # ask: ((record, pair, order, sample), text)
    for k, item in enumerate(items):
        shown = distinct_candidates(item["candidates"])
        records.append(new_record(item, judge.name, mode="pairwise", status="unjudged",
                                  reason=None, shown=shown, pairs=[], flip_rate=None,
                                  errors=[]))
        if len(shown) >= 2:
            asks += _pair_asks(k, item, shown, records[-1]["pairs"], template, samples)

    def take(key: tuple[int, int, int, int], answer: str) -> bool:
        k, p, order, s = key
        record, pair = records[k], records[k]["pairs"][p]
        if isinstance(answer, NoAnswer):
            note_no_answer(record, answer, "a pair is left unanswered")
            return False
        pair["answers"][order].append(stored_answer(answer))
        try:
            pair["choices"][order][s] = parse_choice(answer)
        except ValueError as e:
            record["errors"].append(str(e))
            return True
        return False

    ask_until_parsed(judge, asks, retries, take)
    probs = _label_probs(judge, records, asks, samples)
    for k, record in enumerate(records):
        for p, pair in enumerate(record["pairs"]):
            _settle(pair, [probs.get((k, p, order)) for order in (0, 1)], samples,
                    on_inconsistent)
        if record["status"] == "skipped":
            continue
        record["flip_rate"] = flip_rate(record["pairs"])
        if all(pair["consistent"] is not None for pair in record["pairs"]):
            record["status"] = "judged"
        else:
            record["reason"] = record["errors"][-1] if record["errors"] else "no answer"
    return records


def _pair_asks(k: int, item: dict, shown: list[int], pairs: list[dict], template: str,
               samples: int) -> list[tuple[tuple[int, int, int, int], str]]:
    """Append every pair of item k's `shown` candidates to `pairs` (unanswered) and return
    its asks: each pair in both orders, `samples` times each."""
    texts, asks = item["candidates"], []
    for p, (i, j) in enumerate(combinations(shown, 2)):
        pairs.append({"a": i, "b": j, "answers": [[], []],
                      "choices": [[None] * samples, [None] * samples]})
        for order, (x, y) in enumerate(((i, j), (j, i))):
            text = render_pair(template, item["prompt"], texts[x], texts[y])
            asks.extend(((k, p, order, s), text) for s in range(samples))
    return asks


def _settle(pair: dict, probs: list[list[float] | None], samples: int,
            on_inconsistent: str) -> None:
    """Each order's majority choice and confidence, then the pair's verdict (combine).

    probs: per order, a local judge's label probabilities (None when it gave none)."""
    orders = []
    for order in (0, 1):
        choices = [c for c in pair["choices"][order] if c is not None]
        if not choices:
            orders.append((None, None))
            continue
        choice, agree = majority(choices)
        if samples > 1:
            confidence = agree
        elif probs[order] is not None and choice != TIE:
            confidence = probs[order][choice]
        else:
            confidence = None
        orders.append((choice, confidence))
    pair["choices"] = [c for c, _ in orders]
    pair["confidences"] = [c for _, c in orders]
    pair.update(combine(pair["a"], pair["b"], *orders))
    if pair["consistent"] is False and on_inconsistent == "tie":
        pair["verdict"] = TIE


def _label_probs(judge: Any, records: list[dict], asks: list[tuple], samples: int
                 ) -> dict[tuple, list[float]]:
    """(record, pair, order) -> label probabilities, for a judge that can give them."""
    if samples > 1 or not hasattr(judge, "label_probs"):
        return {}
    wanted = [(key, text) for key, text in asks
              if records[key[0]]["pairs"][key[1]]["choices"][key[2]][0] not in (None, TIE)]
    found = judge.label_probs([text for _, text in wanted]) if wanted else []
    return {key[:3]: p for (key, _), p in zip(wanted, found)}


def pairwise_rows(item: dict, record: dict, judge_name: str, min_confidence: float | None,
                  report: Any) -> list[dict]:
    """The (winner, loser) row of every consistent pair, with its confidence; counts ties,
    flips and pairs under --min-confidence into `report`."""
    if record["status"] != "judged":
        return []
    ident = {"id": item["id"]} if item["id"] is not None else {}
    texts, rows = item["candidates"], []
    for pair in record["pairs"]:
        report.asked += 1
        if pair["consistent"] is False:
            report.flips += 1
            report.dropped += pair["verdict"] is None
        if pair["verdict"] == TIE:
            report.ties += 1
        if pair["consistent"] is not True or pair["verdict"] == TIE:
            continue
        confidence = pair["confidence"]
        if min_confidence is not None and (confidence is None or confidence < min_confidence):
            report.below_confidence += 1
            continue
        winner = pair["verdict"]
        loser = pair["b"] if winner == pair["a"] else pair["a"]
        rows.append({"prompt": item["prompt"], "chosen": texts[winner],
                     "rejected": texts[loser], "source": f"judge:{judge_name}", **ident,
                     "confidence": confidence})
    return rows
