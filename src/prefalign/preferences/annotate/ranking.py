"""Items, rankings and the pairs they imply: the pure part of annotation, shared by the
terminal and the web page.

A ranking is a list of places, best first; each place is one candidate index or, on the web
page, a group of tied candidates. `C A=B D` = [[2], [0, 1], [3]] writes C>A, C>B, C>D, A>D,
B>D: nothing between tied candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any

from prefalign.data.sources import load_rows
from prefalign.errors import ConfigError, DataError
from prefalign.text import printable

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SEPARATORS = ",>"  # and whitespace
STRENGTHS = ("slightly", "clearly")


@dataclass(frozen=True)
class Item:
    """One input row to rank: `prompt` is text or a list of {"role", "content"} messages."""

    prompt: Any
    candidates: tuple[str, ...]
    origin: str
    id: Any = None

    @property
    def key(self) -> str:
        text = json.dumps([self.prompt, list(self.candidates)])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def parse_ranking(text: str, n: int) -> list[int]:
    """`C A B D` (or `c,a,b,d`, `C>A>B>D`, `cabd`) with n=4 -> indices best first [2, 0, 1, 3].

    Raises ValueError with a one-line message for an unknown, repeated or missing label, a
    tie or any other character.
    """
    return [i for group in parse_groups(text, n, ties=False) for i in group]


def parse_groups(text: str, n: int, ties: bool = True) -> list[list[int]]:
    """`C A=B D` with n=4 -> places best first [[2], [0, 1], [3]]; `=` ties the labels on
    either side of it. Every label exactly once; ValueError with a one-line message."""
    groups: list[list[int]] = []
    tie = False
    for char in text.upper():
        if char.isspace() or char in _SEPARATORS:
            continue
        if char == "=":
            if not ties:
                raise ValueError(f"ties are not supported: order every candidate, e.g. "
                                 f"{example(n)}")
            if not groups or tie:
                raise ValueError("= ties two labels: put it between them, e.g. A=B")
            tie = True
            continue
        if char not in LABELS:
            raise ValueError(f"unexpected {char!r}: type labels A-{LABELS[n - 1]}, best first, "
                             f"e.g. {example(n)}")
        index = LABELS.index(char)
        if index >= n:
            raise ValueError(f"unknown label {char}: this item has A-{LABELS[n - 1]}")
        if any(index in group for group in groups):
            raise ValueError(f"{char} appears twice: rank each candidate once")
        if tie:
            groups[-1].append(index)
        else:
            groups.append([index])
        tie = False
    if tie:
        raise ValueError("= ties two labels: put it between them, e.g. A=B")
    if not groups:
        raise ValueError(f"type a ranking, best first, e.g. {example(n)} (? for help)")
    missing = [LABELS[i] for i in range(n) if not any(i in group for group in groups)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: rank all {n} candidates, best first")
    return groups


def _groups(ranking: list) -> list[list[int]]:
    """Places of a ranking of indices or of groups: [2, [0, 1]] -> [[2], [0, 1]]."""
    return [[place] if isinstance(place, int) else list(place) for place in ranking]


def check_identical_adjacent(ranking: list, candidates: tuple[str, ...]) -> None:
    """Raise ValueError unless identical candidates are ranked next to each other: copies
    ranked apart (A D C with A == C) would write A>D and D>C, a pair and its own reverse.
    A tie holding one copy may hold only copies of the same text, for the same reason."""
    places = _groups(ranking)
    order = [i for group in places for i in group]
    for group in identical_groups(candidates):
        at = sorted(order.index(i) for i in group)
        mixed = any(set(place) & set(group) and not set(place) <= set(group) for place in places)
        if at[-1] - at[0] != len(group) - 1 or mixed:
            raise ValueError(f"{_names(group)} are identical: rank them next to each other")


def pairs_from_ranking(ranking: list) -> list[tuple[int, int]]:
    """Every (better, worse) pair a ranking implies: [2, 0, 1] -> [(2, 0), (2, 1), (0, 1)];
    none between tied candidates: [[2], [0, 1]] -> [(2, 0), (2, 1)]."""
    places = _groups(ranking)
    return [(better, worse) for i, group in enumerate(places) for better in group
            for later in places[i + 1:] for worse in later]


def pair_rows(item: Item, ranking: list, strength: str | None = None,
              annotator: str | None = None) -> list[dict]:
    """The output rows of one ranked item; pairs of identical texts are left out. Tied
    candidates share a rank (1 = best; the next place counts the ties: A=B C -> 1, 1, 3)."""
    places = _groups(ranking)
    rank, seen = {}, 0
    for group in places:
        rank.update(dict.fromkeys(group, seen + 1))
        seen += len(group)
    rows = []
    for better, worse in pairs_from_ranking(places):
        chosen, rejected = item.candidates[better], item.candidates[worse]
        if chosen == rejected:
            continue
        row = {"prompt": item.prompt, "chosen": chosen, "rejected": rejected, "source": "human"}
        if item.id is not None:
            row["id"] = item.id
        row["rank_chosen"], row["rank_rejected"] = rank[better], rank[worse]
        if strength is not None:
            row["strength"] = strength
        if annotator is not None:
            row["annotator"] = annotator
        rows.append(row)
    return rows


def identical_groups(candidates: tuple[str, ...] | list[str]) -> list[list[int]]:
    """Indices of candidates sharing one text, groups of two or more: ["a", "b", "a"] -> [[0, 2]]."""
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(candidates):
        groups.setdefault(text, []).append(i)
    return [group for group in groups.values() if len(group) > 1]


def example(n: int) -> str:
    return " ".join([LABELS[1], LABELS[0], *LABELS[2:n]])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _names(group: list[int]) -> str:
    names = [LABELS[i] for i in group]
    return f"{', '.join(names[:-1])} and {names[-1]}"


# ---- input ----------------------------------------------------------------------------------


def read_items(path: str | os.PathLike) -> list[Item]:
    """Every row of `path` as an Item; DataError naming file and line for a malformed row."""
    return [_item(data, origin) for data, origin in load_rows(str(path))]


def _item(data: Any, origin: str) -> Item:
    missing = [key for key in ("prompt", "candidates") if key not in data]
    if missing:
        raise DataError(f"{origin}: no {' or '.join(missing)} field; annotate reads rows with "
                        "prompt and candidates, as `prefalign generate --keep-candidates` "
                        "writes them")
    prompt, candidates = data["prompt"], data["candidates"]
    if not isinstance(prompt, str) and not (
        isinstance(prompt, list) and prompt
        and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt)
    ):
        raise DataError(f"{origin}: prompt must be text or a list of {{role, content}} messages")
    if not isinstance(candidates, (list, tuple)) or not all(isinstance(c, str) for c in candidates):
        raise DataError(f"{origin}: candidates must be a list of strings")
    if not 2 <= len(candidates) <= len(LABELS):
        raise DataError(f"{origin}: {len(candidates)} candidates; ranking needs 2 to "
                        f"{len(LABELS)} (labels A-Z)")
    return Item(prompt, tuple(candidates), origin, data.get("id"))


def select_items(items: list[Item], select: str = "all", limit: int | None = None,
                 judgments: str | os.PathLike | None = None, seed: int = 0) -> list[Item]:
    """The items to ask about: all (in input order), `random` (seeded, in input order) or
    `uncertain`: judged items of a pairwise `prefalign judge` run (its OUTPUT.judgments.jsonl,
    whose `index` is the row's place in this input), most flipped first, then least
    confident; at most `limit`."""
    if select not in ("all", "random", "uncertain"):
        raise ConfigError(f"--select {select}: choose all, random or uncertain")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: give 1 or more items")
    if select == "uncertain" and not judgments:
        raise ConfigError("--select uncertain needs --judgments FILE (the OUTPUT.judgments.jsonl "
                          "of `prefalign judge --mode pairwise` on this input)")
    count = len(items) if limit is None else min(limit, len(items))
    if select == "all":
        return items[:count]
    if select == "random":
        return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), count))]
    ranked = []
    for data, origin in load_rows(str(judgments)):
        index = data.get("index")
        if not isinstance(index, int) or not 0 <= index < len(items):
            raise DataError(f"{origin}: 'index' {printable(repr(index))[:40]} is not a row of "
                            f"the input ({len(items)} rows); give the judgments of a judge run "
                            "on this same input")
        line = str(data.get("origin", "")).rsplit(":", 1)[-1]
        if line != items[index].origin.rsplit(":", 1)[-1]:
            raise DataError(f"{origin}: judges row {data.get('origin')!r}, but row {index} of "
                            f"the input is {items[index].origin}; give the judgments of a judge "
                            "run on this same input")
        pairs = data.get("pairs")
        if data.get("status") != "judged" or not isinstance(pairs, list) or not pairs:
            continue
        confidences = [p["confidence"] for p in pairs
                       if isinstance(p, dict) and isinstance(p.get("confidence"), (int, float))]
        flips = data.get("flip_rate") or 0.0
        ranked.append((-flips, min(confidences, default=1.0), index))
    if not ranked:
        raise DataError(f"{judgments}: no judged pairwise items; --select uncertain reads the "
                        "judgments of `prefalign judge --mode pairwise`")
    return [items[index] for _, _, index in sorted(ranked)[:count]]
