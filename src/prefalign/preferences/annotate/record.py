"""The annotation record on disk: OUTPUT.progress.json (every decision) and OUTPUT (the
pairs), rewritten whole and atomically after every decision.

The record, one decision per item:
    {"format": "prefalign-annotate/1", "input": "candidates.jsonl", "decisions": [
     {"origin": "candidates.jsonl:1", "key": "9f2c...", "ranking": ["C", "A", "B", "D"]},
     {"origin": "candidates.jsonl:2", "key": "41d0...", "skipped": true}]}
The terminal records the items in input order. A record of the web page (`--serve`) names
its "annotator" and lists that person's decisions in the order they were made, each found
again by origin and key; its rankings may hold ties ("A=B") and, for an item of two
candidates, a "strength" ("slightly" or "clearly").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefalign.errors import DataError, atomic_file
from prefalign.preferences.annotate.ranking import (
    LABELS,
    STRENGTHS,
    Item,
    pair_rows,
    parse_groups,
    parse_ranking,
)

PROGRESS_SUFFIX = ".progress.json"
PROGRESS_FORMAT = "prefalign-annotate/1"
KEPT = " (the decisions recorded before are kept: the same command continues)"


@dataclass
class Summary:
    """What an annotation session left on disk."""

    items: int
    ranked: int
    skipped: int
    pairs: int
    finished: bool


def progress_path(output: Path) -> Path:
    return Path(str(output) + PROGRESS_SUFFIX)


def read_record(progress: Path, output: Path) -> dict | None:
    """The parsed record, or None when there is none yet (and OUTPUT is empty or absent)."""
    if not progress.exists():
        if output.exists() and output.stat().st_size > 0:
            raise DataError(f"{output}: already exists and has no {progress.name} beside it; "
                            "choose another --output or move the file away")
        return None
    try:
        state = json.loads(progress.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{progress}: cannot read the annotation record ({e})") from None
    if not isinstance(state, dict) or state.get("format") != PROGRESS_FORMAT or not isinstance(
        state.get("decisions"), list
    ):
        raise DataError(f"{progress}: not a prefalign annotate record")
    return state


def load_progress(progress: Path, output: Path, items: list[Item]) -> list[dict]:
    """The decisions of a terminal record, checked against the input rows in order."""
    state = read_record(progress, output)
    if state is None:
        return []
    if "annotator" in state:
        raise DataError(f"{progress}: written by `annotate --serve` for annotator "
                        f"{state['annotator']!r}; continue it with --serve, or choose another "
                        "--output")
    decisions = state["decisions"]
    restart = f"restore the input, or move {progress.name} and {output.name} away to start over"
    if len(decisions) > len(items):
        raise DataError(f"{progress}: records {len(decisions)} decisions but the input has "
                        f"{len(items)} rows; {restart}")
    for number, (decision, item) in enumerate(zip(decisions, items), start=1):
        if not isinstance(decision, dict) or decision.get("key") != item.key:
            raise DataError(f"{item.origin}: not the row ranked as item {number} in "
                            f"{progress.name} (the input changed); {restart}")
        if not decision.get("skipped"):
            try:
                parse_ranking("".join(decision.get("ranking") or ""), len(item.candidates))
            except (TypeError, ValueError) as e:
                raise DataError(f"{progress}: item {number}: bad ranking ({e})") from None
    return decisions


def check_decision(decision: dict, item: Item) -> None:
    """ValueError unless a web decision's ranking (ties allowed) and strength fit `item`."""
    if decision.get("skipped"):
        return
    ranking = decision.get("ranking")
    if not isinstance(ranking, list) or not all(isinstance(p, str) for p in ranking):
        raise ValueError("ranking must be a list of labels")
    groups = parse_groups(" ".join(ranking), len(item.candidates))
    strength = decision.get("strength")
    if strength is not None and (strength not in STRENGTHS or len(groups) != 2
                                 or len(item.candidates) != 2):
        raise ValueError(f"strength ({' or '.join(STRENGTHS)}) is for an item of two "
                         "candidates ranked without a tie")


def decision_groups(decision: dict) -> list[list[int]]:
    """The places of a recorded ranking: ["C", "A=B"] -> [[2], [0, 1]]."""
    return [[LABELS.index(label) for label in place.split("=")] for place in decision["ranking"]]


def save(output: Path, progress: Path, items: list[Item], decisions: list[dict],
         input_name: str, annotator: str | None = None, order: list[int] | None = None) -> None:
    """Write the record, then rebuild OUTPUT from it. `items[i]` is the item of
    `decisions[i]`; OUTPUT lists their pairs in that order, or in `order` (positions in
    `decisions`: the web page writes pairs in input order, decisions as they were made)."""
    body = ",\n".join(json.dumps(d, ensure_ascii=False) for d in decisions)
    who = "" if annotator is None else f'"annotator": {json.dumps(annotator)}, '
    _write_atomic(progress, f'{{"format": "{PROGRESS_FORMAT}", "input": '
                            f'{json.dumps(input_name)}, {who}"decisions": [\n{body}\n]}}\n')
    if order is not None:
        items, decisions = [items[i] for i in order], [decisions[i] for i in order]
    rows = all_pairs(items, decisions, annotator)
    _write_atomic(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def all_pairs(items: list[Item], decisions: list[dict], annotator: str | None = None
              ) -> list[dict]:
    """The output rows of every ranked item, in the order of `items`."""
    return [row for item, decision in zip(items, decisions) if not decision.get("skipped")
            for row in pair_rows(item, decision_groups(decision), decision.get("strength"),
                                 annotator)]


def _write_atomic(path: Path, text: str) -> None:
    # A rename replaces the file whole, so a reader (or a crash) never sees half of it; a
    # full disk or read-only folder leaves the earlier file and no temp file behind.
    with atomic_file(path, "w", KEPT, "--output") as handle:
        handle.write(text)


def summarize(items: list[Item], decisions: list[dict]) -> Summary:
    ranked = sum(not d.get("skipped") for d in decisions)
    return Summary(len(items), ranked, len(decisions) - ranked, len(all_pairs(items, decisions)),
                   len(decisions) == len(items))
