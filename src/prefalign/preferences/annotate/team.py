"""Several annotators at once: who gets which item, and one record per annotator.

Each annotator's labels go to OUTPUT with the name before the suffix (labels.jsonl ->
labels.alice.jsonl, record labels.alice.jsonl.progress.json), in the terminal tool's
format: every save rewrites both atomically, and the records found beside OUTPUT at
start are resumed. An item is wanted `copies` times: twice for the `overlap` fraction of
items (drawn with `seed`), else once. An annotator asking for work gets, in input order,
the first item they have not decided whose rankings plus the items others hold open are
fewer than its copies. An item someone opened stays theirs for LEASE_SECONDS after their
last request, so that a closed browser does not keep it forever. A skip does not count
as a label: the item goes to someone else.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefalign.errors import DataError, writing
from prefalign.preferences.annotate.ranking import (
    LABELS,
    Item,
    check_identical_adjacent,
    identical_groups,
)
from prefalign.preferences.annotate.record import (
    KEPT,
    check_decision,
    decision_groups,
    progress_path,
    read_record,
    save,
)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
LEASE_SECONDS = 600.0


def annotator_output(output: Path, name: str) -> Path:
    """labels.jsonl -> labels.alice.jsonl (a name goes before the suffix)."""
    return output.with_name(f"{output.stem}.{name}{output.suffix}")


def overlap_copies(n: int, overlap: float, seed: int) -> list[int]:
    """How many annotators each of n items goes to: round(overlap * n) items, drawn with
    `seed`, go to two, the rest to one."""
    twice = set(random.Random(seed).sample(range(n), round(overlap * n)))
    return [2 if i in twice else 1 for i in range(n)]


@dataclass
class Annotator:
    name: str
    output: Path
    decisions: list[dict] = field(default_factory=list)  # in the order they were made
    positions: list[int] = field(default_factory=list)  # the item index of each decision
    current: int | None = None  # the item shown to them now


class Team:
    """The shared state behind the web page; every public method holds one lock."""

    def __init__(self, items: list[Item], output: Path, input_name: str, overlap: float = 0.0,
                 seed: int = 0, clock=time.monotonic) -> None:
        self.items, self.output, self.input_name = items, Path(output), input_name
        self.copies = overlap_copies(len(items), overlap, seed)
        self.clock, self.lock = clock, threading.Lock()
        self.index = {(item.origin, item.key): i for i, item in enumerate(items)}
        self.annotators: dict[str, Annotator] = {}
        self.leases: dict[int, dict[str, float]] = {}
        self.ranked_by: list[set[str]] = [set() for _ in items]
        with writing(self.output, KEPT, "--output"):
            self.output.parent.mkdir(parents=True, exist_ok=True)
        # Every annotator's record beside OUTPUT (by name, not glob: OUTPUT may hold "[").
        head, tail = f"{self.output.stem}.", f"{self.output.suffix}.progress.json"
        for record in sorted(self.output.parent.iterdir()):
            name = record.name[len(head):-len(tail)]
            if record.name.startswith(head) and record.name.endswith(tail) and NAME.fullmatch(
                    name):
                self._load(name)

    # ---- loading and saving ----------------------------------------------------------------

    def _load(self, name: str) -> Annotator:
        output = annotator_output(self.output, name)
        record = progress_path(output)
        person = Annotator(name, output)
        state = read_record(record, output)
        restart = f"restore the input, or move {record.name} and {output.name} away"
        for number, decision in enumerate(state["decisions"] if state else [], start=1):
            where = f"{record}: decision {number}"
            at = self.index.get((decision.get("origin"), decision.get("key"))) if isinstance(
                decision, dict) else None
            if at is None:
                raise DataError(f"{where}: not an item of this input (the input or --select "
                                f"changed); {restart}")
            if at in person.positions:
                raise DataError(f"{where}: {decision['origin']} is decided twice; {restart}")
            try:
                check_decision(decision, self.items[at])
            except ValueError as e:
                raise DataError(f"{where}: bad ranking ({e})") from None
            person.decisions.append(decision)
            person.positions.append(at)
            if not decision.get("skipped"):
                self.ranked_by[at].add(name)
        self.annotators[name] = person
        return person

    def _person(self, name: object) -> Annotator:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError("a name is 1 to 40 letters, digits, - or _, starting with a "
                             "letter or digit")
        return self.annotators.get(name) or self._load(name)

    def _save(self, person: Annotator, decisions: list[dict], positions: list[int]) -> None:
        """Write the person's files; only then take the new decisions as theirs, so a failed
        write (a full disk) leaves memory and disk as they were."""
        order = sorted(range(len(positions)), key=positions.__getitem__)
        save(person.output, progress_path(person.output), [self.items[i] for i in positions],
             decisions, self.input_name, annotator=person.name, order=order)
        person.decisions, person.positions = decisions, positions

    # ---- what the page asks ----------------------------------------------------------------

    def next(self, name: object) -> dict:
        """The item to show `name` now (the same one until they decide it) and the progress."""
        with self.lock:
            person = self._person(name)
            return self._view(person, self._assign(person))

    def decide(self, name: object, key: object, ranking: object = None,
               strength: object = None, skip: bool = False) -> dict:
        """Record a ranking (labels best first, "A=B" for a tie) or a skip of the item shown
        to `name`, whose key the page sends back; then the next item."""
        with self.lock:
            person = self._person(name)
            # After a restart of the server the page still shows the item it was given:
            # the same assignment gives it again.
            at = person.current if person.current is not None else self._assign(person)
            if at is None or key != self.items[at].key:
                raise ValueError("this item is no longer yours to label: reload the page")
            item = self.items[at]
            decision: dict = {"origin": item.origin, "key": item.key}
            if skip:
                decision["skipped"] = True
            else:
                decision["ranking"] = ranking
                if strength is not None:
                    decision["strength"] = strength
                check_decision(decision, item)
                check_identical_adjacent(decision_groups(decision), item.candidates)
            self._save(person, [*person.decisions, decision], [*person.positions, at])
            if not skip:
                self.ranked_by[at].add(person.name)
            self._release(person)
            return self._view(person, self._assign(person))

    def undo(self, name: object) -> dict:
        """Take back `name`'s last decision (of this or an earlier session) and show its item."""
        with self.lock:
            person = self._person(name)
            if not person.decisions:
                raise ValueError("nothing to undo")
            at = person.positions[-1]
            self._save(person, person.decisions[:-1], person.positions[:-1])
            self.ranked_by[at].discard(person.name)
            self._release(person)
            person.current = at
            self.leases.setdefault(at, {})[person.name] = self.clock()
            return self._view(person, at)

    # ---- assignment ------------------------------------------------------------------------

    def _assign(self, person: Annotator) -> int | None:
        now = self.clock()
        if person.current is not None:
            self.leases.setdefault(person.current, {})[person.name] = now
            return person.current
        decided = set(person.positions)
        for at in range(len(self.items)):
            if at in decided:
                continue
            held = {other for other, since in self.leases.get(at, {}).items()
                    if now - since < LEASE_SECONDS and other != person.name}
            if len(self.ranked_by[at] | held) < self.copies[at]:
                person.current = at
                self.leases.setdefault(at, {})[person.name] = now
                return at
        return None

    def _release(self, person: Annotator) -> None:
        if person.current is not None:
            self.leases.get(person.current, {}).pop(person.name, None)
        person.current = None

    def _view(self, person: Annotator, at: int | None) -> dict:
        ranked = sum(not d.get("skipped") for d in person.decisions)
        progress = {"ranked": ranked, "skipped": len(person.decisions) - ranked,
                    "labels": sum(min(len(r), c) for r, c in zip(self.ranked_by, self.copies)),
                    "wanted": sum(self.copies), "items": len(self.items),
                    "can_undo": bool(person.decisions)}
        if at is None:
            return {"item": None, "progress": progress}
        item = self.items[at]
        return {"item": {"key": item.key, "origin": item.origin, "prompt": item.prompt,
                         "candidates": list(item.candidates), "labels": LABELS[:len(item.candidates)],
                         "identical": identical_groups(item.candidates)},
                "progress": progress}
