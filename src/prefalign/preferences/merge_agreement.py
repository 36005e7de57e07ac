"""`data merge --agreement`: combine several annotators' labels of the same pairs.

Every input counts as one annotator, except that rows with an `annotator` field count as
that person (one file may then hold several). A pair is its prompt and its two texts in
either order; each annotator's vote is the text they preferred, or a tie when they ranked
the two texts equally (no row, but equal ranks: labels.py), which agrees with neither text.
An annotator who labelled a pair both ways casts no vote on it, and is counted. With n
annotators voting on a pair:

  agreed   the pair is kept when all n chose the same text and n >= min_annotators; it is
           written once (the heaviest copy, as deduplication keeps), else dropped
  weight   each direction any annotator chose is written once, with its weight multiplied
           by the fraction of the n annotators who chose it (2 of 3: 2/3, the other
           direction 1/3); a trainer that averages with the weights then fits the soft
           label the votes give. Pairs with n < min_annotators are dropped.

A pair labelled by one person only is "agreed" with weight 1 unless min_annotators is 2
or more. Each kept row sits where its pair first appeared (for weight, the two directions
of a pair next to each other, the first seen first).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefalign.config import Section, option, require

AGREEMENT_MODES = ("agreed", "weight")
TIE = "tie"


@dataclass(frozen=True)
class AgreementOptions(Section):
    """`data merge`'s options for several annotators' label files of the same items."""

    SECTION = "agreement between annotators"

    agreement: str | None = option(None, "combine annotators' labels of the same pair: agreed "
                                   "keeps pairs all who labelled them agree on; weight "
                                   "weights each direction by the fraction who chose it "
                                   "(each input is one annotator, or rows name theirs in "
                                   "'annotator')", choices=AGREEMENT_MODES)
    min_annotators: int = option(1, "with --agreement: drop pairs fewer annotators labelled")

    def validate(self) -> None:
        require(self.min_annotators >= 1, "min_annotators", "must be >= 1")
        super().validate()


@dataclass
class AgreementCounts:
    """What --agreement did to the pairs: `pairs` distinct pairs seen; `kept` of them
    written; `disputed` dropped for disagreement (agreed mode) or because every vote was a
    tie; `too_few` dropped for fewer than min_annotators votes; `conflicting` votes left out
    (one annotator, both ways)."""

    mode: str
    min_annotators: int
    pairs: int = 0
    kept: int = 0
    disputed: int = 0
    too_few: int = 0
    conflicting: int = 0

    def format(self) -> str:
        return (f"agreement ({self.mode}): {self.kept} of {self.pairs} pairs kept; "
                f"{self.disputed} dropped for disagreement (or all ties), {self.too_few} "
                f"with fewer than {self.min_annotators} annotators; {self.conflicting} votes "
                "left out (one annotator, both ways)")


def _key(value: Any) -> str:
    # Messages are dicts: sort their keys so the same text always gives the same key.
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def pair_key(row: dict) -> str:
    """The pair a row labels: its prompt and its two texts in either order."""
    return _key([row["prompt"], sorted((_key(row["chosen"]), _key(row["rejected"])))])


def combine(entries: list, annotator: Callable[[Any], str], weight: Callable[[Any], float],
            mode: str, min_annotators: int, on_removed: Callable[[Any, bool], None],
            ties: list[tuple[str, Any, tuple[str, str]]] = ()) -> tuple[list, AgreementCounts]:
    """The entries to keep (see the module docstring). Each entry has `.row` (prompt,
    chosen, rejected, weight); annotator(entry) names who labelled it, weight(entry) ranks
    copies (the heaviest is kept); on_removed(entry, dropped) is called for every entry not
    kept: dropped is False for a copy of a kept row, True for a row of a dropped pair.
    ties: (annotator, prompt, (text, text)) for each tie vote; a tie on a pair no row
    compares has nothing to write and is passed over."""
    counts = AgreementCounts(mode, min_annotators)
    pairs: dict[str, dict] = {}  # pair -> votes by annotator, copies by direction
    for position, entry in enumerate(entries):
        row = entry.row
        direction = (_key(row["chosen"]), _key(row["rejected"]))
        pair = pair_key(row)
        state = pairs.setdefault(pair, {"votes": {}, "conflicted": set(), "copies": {},
                                        "first": position})
        who = annotator(entry)
        if state["votes"].get(who, direction) != direction:
            state["conflicted"].add(who)
        state["votes"][who] = direction
        state["copies"].setdefault(direction, []).append((position, entry))
    for who, prompt, texts in ties:
        state = pairs.get(_key([prompt, sorted(_key(t) for t in texts)]))
        if state is not None:
            if state["votes"].get(who, TIE) != TIE:
                state["conflicted"].add(who)
            state["votes"][who] = TIE
    counts.pairs = len(pairs)
    kept: list[tuple[int, Any]] = []
    for state in pairs.values():
        for who in state["conflicted"]:
            del state["votes"][who]
        counts.conflicting += len(state["conflicted"])
        factors = _decide(state, mode, min_annotators, counts)
        for direction, copies in state["copies"].items():
            # max keeps the first of equally heavy copies, as deduplication does.
            best = max((entry for _, entry in copies), key=weight)
            for _, copy in copies:
                if copy is not best or direction not in factors:
                    on_removed(copy, direction not in factors)
            if direction in factors:
                best.row["weight"] *= factors[direction]
                kept.append(((state["first"], copies[0][0]), best))
    return [entry for _, entry in sorted(kept, key=lambda item: item[0])], counts


def _decide(state: dict, mode: str, min_annotators: int, counts: AgreementCounts
            ) -> dict[tuple, float]:
    """direction -> the factor its weight is multiplied by, for the directions kept."""
    votes = list(state["votes"].values())
    if not votes or len(votes) < min_annotators:
        counts.too_few += 1
        return {}
    shares = {d: votes.count(d) / len(votes) for d in set(votes) if d != TIE}
    if mode == "agreed" and len(set(votes)) > 1:
        counts.disputed += 1
        return {}
    if not shares:  # every vote a tie: no direction to write
        counts.disputed += 1
        return {}
    counts.kept += 1
    return shares if mode == "weight" else {d: 1.0 for d in shares}
