"""Read human label files as votes: who preferred which of two texts for one prompt.

A label file is what `prefalign annotate` writes: JSONL rows
    {"prompt", "chosen", "rejected", "source": "human", "id"?, "rank_chosen"?,
     "rank_rejected"?, "annotator"?, "strength"?}
one row per pair a ranking implies (`annotate --serve` writes one file per annotator, with
`annotator` on every row). The annotator of a row is its `annotator` field when it has one
(a file may then hold several people), else the file's name without its suffix (its path
when two files share a name). Tied candidates get no pair row but share a rank (A=B C:
ranks 1, 1, 3), so two texts of one prompt that an annotator ranked equally, and did not
compare in any row, count as that annotator's tie vote (not when a text has two different
ranks for that prompt and annotator: an input that repeats a prompt with other candidates).

A pair is identified by its prompt and its two texts in either order, so labels of the same
candidates match whoever wrote them and in whatever order they were shown. A pair one
annotator labelled both ways (an input with a repeated item) is left out for that annotator
and counted; pairs of identical texts carry no preference and are skipped.

Anything else (an Argilla or Label Studio export, a progress record, rows without the
fields) is refused with the file, the line and what to do.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.errors import DataError
from prefalign.text import printable

TIE = "tie"


@dataclass(frozen=True)
class Vote:
    """One annotator's label of one pair: `texts` sorted; `choice` 0 or 1 (the index in
    `texts` of the preferred text) or TIE; `ranks` the texts' places in the annotator's
    ranking of the prompt's candidates, when the file records them."""

    annotator: str
    prompt: Any
    texts: tuple[str, str]
    choice: int | str
    origin: str
    ranks: tuple[int, int] | None = None
    id: Any = None

    @property
    def item(self) -> str:
        """The prompt as a key: the same prompt always gives the same key."""
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)

    @property
    def unit(self) -> tuple[str, tuple[str, str]]:
        return self.item, self.texts


@dataclass
class LabelSet:
    """Every vote read, by annotator, with what was left out."""

    votes: dict[str, dict[tuple, Vote]] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)
    conflicting: int = 0  # pairs an annotator labelled both ways, left out
    identical: int = 0  # rows whose two texts are the same, skipped

    @property
    def annotators(self) -> list[str]:
        return list(self.votes)


def annotator_names(paths: list[str | os.PathLike]) -> list[str]:
    """Each file's default annotator name: its stem, or its path where stems collide."""
    stems = [Path(str(p)).stem for p in paths]
    return [stem if stems.count(stem) == 1 else str(p) for stem, p in zip(stems, paths)]


def read_label_files(paths: list[str | os.PathLike],
                     items: str | os.PathLike | None = None) -> LabelSet:
    """The votes in `paths` (see the module docstring). With `items` (the candidates file
    the labels were made from), a label of a prompt or text not in it is a DataError."""
    from prefalign.data.sources import load_rows

    known = _known_items(items) if items is not None else None
    labels = LabelSet()
    conflicted: set[tuple] = set()
    for path, default in zip(paths, annotator_names(paths)):
        for data, origin in load_rows(str(path)):
            vote = parse_vote(data, origin, default)
            if vote is None:
                labels.identical += 1
                continue
            if known is not None:
                _check_known(vote, known, items)
            files = labels.files.setdefault(vote.annotator, [])
            if str(path) not in files:
                files.append(str(path))
            mine = labels.votes.setdefault(vote.annotator, {})
            key = vote.unit
            if key in mine and mine[key].choice != vote.choice:
                conflicted.add((vote.annotator, key))
            mine[key] = vote
    for annotator, key in conflicted:
        del labels.votes[annotator][key]
    labels.conflicting = len(conflicted)
    for votes in labels.votes.values():
        _add_ties(votes)
    if not any(labels.votes.values()):
        raise DataError(f"{', '.join(map(str, paths))}: no labelled pair (every row compares "
                        "identical texts, or every pair was labelled both ways)")
    return labels


def parse_vote(data: Any, origin: str, annotator: str) -> Vote | None:
    """The vote of one label row; None for a pair of identical texts."""
    if not isinstance(data, dict):
        raise DataError(f"{origin}: not a label row; give the pairs file prefalign annotate "
                        "writes")
    _refuse_other_formats(data, origin)
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in data]
    if missing:
        raise DataError(f"{origin}: no {' or '.join(missing)} field; a label row has prompt, "
                        "chosen and rejected, as `prefalign annotate` writes them")
    chosen, rejected = data["chosen"], data["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise DataError(f"{origin}: chosen and rejected must be text")
    name = data.get("annotator", annotator)
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{origin}: field 'annotator' must be a non-empty name, got "
                        f"{printable(repr(name))[:40]}")
    ranks = _ranks(data, origin)
    if chosen == rejected:
        return None
    texts = (chosen, rejected) if chosen < rejected else (rejected, chosen)
    if ranks is not None and texts[0] != chosen:
        ranks = (ranks[1], ranks[0])
    choice = int(texts[1] == chosen)
    return Vote(name.strip(), data["prompt"], texts, choice, origin, ranks, data.get("id"))


def _ranks(data: dict, origin: str) -> tuple[int, int] | None:
    if "rank_chosen" not in data and "rank_rejected" not in data:
        return None
    ranks = data.get("rank_chosen"), data.get("rank_rejected")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise DataError(f"{origin}: rank_chosen and rank_rejected must both be whole numbers "
                        f">= 1 (places counted from 1 = best), got {ranks[0]!r}, {ranks[1]!r}")
    if ranks[0] >= ranks[1]:
        raise DataError(f"{origin}: rank_chosen {ranks[0]} is not better (smaller) than "
                        f"rank_rejected {ranks[1]}")
    return ranks


def _refuse_other_formats(data: dict, origin: str) -> None:
    """A one-line fix for the files people are most likely to give by mistake."""
    name = origin.rsplit(":", 1)[0].rsplit(" row ", 1)[0]
    if str(data.get("format", "")).startswith("prefalign-annotate"):
        raise DataError(f"{origin}: this is annotate's progress record; give the pairs file "
                        f"beside it ({name.removesuffix('.progress.json')})")
    if "data" in data and ("annotations" in data or "predictions" in data):
        raise DataError(f"{origin}: a Label Studio task; convert the export first: prefalign "
                        f"data import --format label-studio {name} labels.jsonl")
    if "fields" in data and "responses" in data:
        raise DataError(f"{origin}: an Argilla record; convert the export first: prefalign "
                        f"data import --format argilla {name} labels.jsonl")


def tie_votes(rows: list, annotator: str) -> list[Vote]:
    """The tie votes implied by the ranks of label rows (see the module docstring); rows
    without rank_chosen and rank_rejected are passed over."""
    by_annotator: dict[str, dict[tuple, Vote]] = defaultdict(dict)
    for data, origin in rows:
        if isinstance(data, dict) and "rank_chosen" in data and "rank_rejected" in data \
                and isinstance(data.get("chosen"), str) and isinstance(data.get("rejected"), str):
            vote = parse_vote(data, origin, annotator)
            if vote is not None:
                by_annotator[vote.annotator][vote.unit] = vote
    ties = []
    for votes in by_annotator.values():
        _add_ties(votes)
        ties += [vote for vote in votes.values() if vote.choice == TIE]
    return ties


def _add_ties(votes: dict[tuple, Vote]) -> None:
    """Add a TIE vote for every two texts of a prompt this annotator ranked equally."""
    places: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    first: dict[str, Vote] = {}
    for vote in votes.values():
        if vote.ranks is None:
            continue
        first.setdefault(vote.item, vote)
        for text, rank in zip(vote.texts, vote.ranks):
            places[vote.item][text].add(rank)
    for item, by_text in places.items():
        if any(len(ranks) > 1 for ranks in by_text.values()):
            continue  # the prompt was ranked twice, with other candidates: places differ
        texts = sorted(by_text)
        for i, a in enumerate(texts):
            for b in texts[i + 1:]:
                rank = next(iter(by_text[a]))
                if rank == next(iter(by_text[b])) and (item, (a, b)) not in votes:
                    vote = first[item]
                    votes[(item, (a, b))] = Vote(vote.annotator, vote.prompt, (a, b), TIE,
                                                 vote.origin, (rank, rank), vote.id)


def _known_items(path: str | os.PathLike) -> dict[str, set[str]]:
    """prompt key -> every candidate text of the rows with that prompt."""
    from prefalign.preferences.annotate import read_items

    known: dict[str, set[str]] = defaultdict(set)
    for item in read_items(path):
        known[json.dumps(item.prompt, sort_keys=True, ensure_ascii=False)].update(
            item.candidates)
    return known


def _check_known(vote: Vote, known: dict[str, set[str]], items: Any) -> None:
    texts = known.get(vote.item)
    fix = f"give the candidates file these labels were made from as --items (not {items})"
    if texts is None:
        prompt = printable(str(vote.prompt), keep="")[:60]
        raise DataError(f"{vote.origin}: labels prompt {prompt!r}, which is not in {items}; "
                        f"{fix}")
    for text in vote.texts:
        if text not in texts:
            raise DataError(f"{vote.origin}: labels a text that is not a candidate of its "
                            f"prompt in {items}: {printable(text, keep='')[:60]!r}; {fix}")
