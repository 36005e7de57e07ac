"""Rank candidate completions by hand in the terminal and write every pair a ranking implies.

    prefalign annotate --input candidates.jsonl --output human.jsonl

Input rows have `prompt` (text or chat messages) and `candidates` (2 to 26 strings), as
`prefalign generate --keep-candidates` writes them; `id` is passed on, other columns are not.
Each item shows the prompt and its candidates labelled A, B, C, ..., side by side when the
terminal is wide enough, else stacked. The annotator types a full ranking, best first:
`C A B D` (or `c,a,b,d`, `C>A>B>D`, `cabd`); ties and partial rankings are refused so that
every item yields one consistent set of pairs. s skips, u undoes (back one item), q, Ctrl-D
and Ctrl-C quit, ? helps. C A B D writes C>A, C>B, C>D, A>B, A>D, B>D as JSONL rows
    {"prompt", "chosen", "rejected", "source": "human", "id" (if the row has one),
     "rank_chosen", "rank_rejected"}                 ranks count from 1 = best
leaving out pairs of identical texts (trainers drop them anyway).

--select random --limit N asks about N rows drawn with --seed (in input order); --select
uncertain --judgments J asks first about the rows where a `prefalign judge --mode pairwise`
run on the same input (J: its OUTPUT.judgments.jsonl) flipped most with the order shown,
then where it was least confident, so human labels go where the judge is least reliable.

OUTPUT.progress.json is the whole state, one decision per input row in input order:
    {"format": "prefalign-annotate/1", "input": "candidates.jsonl", "decisions": [
     {"origin": "candidates.jsonl:1", "key": "9f2c...", "ranking": ["C", "A", "B", "D"]},
     {"origin": "candidates.jsonl:2", "key": "41d0...", "skipped": true}]}
`key` hashes the row's prompt and candidates, so an edited input is reported rather than
matched with old decisions. After every decision the sidecar, then OUTPUT, is rewritten whole
(temporary file, fsync, rename), and OUTPUT is rebuilt from the sidecar at every start: a
session stopped at any moment resumes at the first undecided row with nothing lost or
duplicated, `u` can undo the last decision of an earlier session, and rows appended to the
input later are picked up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, TextIO

from prefalign.data.sources import load_rows
from prefalign.errors import DataError, atomic_file, writing
from prefalign.text import printable

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Below this a column holds two or three words per line and is harder to read than a stack.
MIN_COLUMN = 20
GUTTER = " | "
PROGRESS_SUFFIX = ".progress.json"
KEPT = " (the decisions recorded before are kept: the same command continues)"
PROGRESS_FORMAT = "prefalign-annotate/1"
_SEPARATORS = ",>"  # and whitespace
# Generated text may contain escape sequences that would move the cursor or recolour the
# screen: control characters are shown as "?"; tab and newline are handled by the wrapping.
_CLEAR = "\x1b[H\x1b[2J"
HELP = """\
Type the labels of all candidates from best to worst, e.g. "C A B D" (spaces, commas or
">" between them, or none; any case). Every label exactly once: no ties, no partial rankings.
  s  skip this item (recorded as skipped, not asked again)
  u  undo: go back one item and remove its pairs
  q  quit (Ctrl-D and Ctrl-C too); progress is saved after every item and running the
     same command again continues where you stopped
A ranking writes every pair it implies: C A B -> C>A, C>B, A>B.
"""


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


@dataclass
class Summary:
    """What an annotation session left on disk."""

    items: int
    ranked: int
    skipped: int
    pairs: int
    finished: bool


# ---- pure functions -------------------------------------------------------------------------


def parse_ranking(text: str, n: int) -> list[int]:
    """`C A B D` (or `c,a,b,d`, `C>A>B>D`, `cabd`) with n=4 -> indices best first [2, 0, 1, 3].

    Raises ValueError with a one-line message for an unknown, repeated or missing label, a
    tie or any other character.
    """
    order: list[int] = []
    for char in text.upper():
        if char.isspace() or char in _SEPARATORS:
            continue
        if char == "=":
            raise ValueError(f"ties are not supported: order every candidate, e.g. {example(n)}")
        if char not in LABELS:
            raise ValueError(f"unexpected {char!r}: type labels A-{LABELS[n - 1]}, best first, "
                             f"e.g. {example(n)}")
        index = LABELS.index(char)
        if index >= n:
            raise ValueError(f"unknown label {char}: this item has A-{LABELS[n - 1]}")
        if index in order:
            raise ValueError(f"{char} appears twice: rank each candidate once")
        order.append(index)
    if not order:
        raise ValueError(f"type a ranking, best first, e.g. {example(n)} (? for help)")
    missing = [LABELS[i] for i in range(n) if i not in order]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: rank all {n} candidates, best first")
    return order


def check_identical_adjacent(ranking: list[int], candidates: tuple[str, ...]) -> None:
    """Raise ValueError unless identical candidates are ranked next to each other: copies
    ranked apart (A D C with A == C) would write A>D and D>C, a pair and its own reverse."""
    for group in identical_groups(candidates):
        places = sorted(ranking.index(i) for i in group)
        if places[-1] - places[0] != len(group) - 1:
            raise ValueError(f"{_names(group)} are identical: rank them next to each other")


def pairs_from_ranking(ranking: list[int]) -> list[tuple[int, int]]:
    """Every (better, worse) pair a ranking implies: [2, 0, 1] -> [(2, 0), (2, 1), (0, 1)]."""
    return [(better, worse) for i, better in enumerate(ranking) for worse in ranking[i + 1:]]


def pair_rows(item: Item, ranking: list[int]) -> list[dict]:
    """The output rows of one ranked item; pairs of identical texts are left out."""
    rank = {candidate: place for place, candidate in enumerate(ranking, start=1)}
    rows = []
    for better, worse in pairs_from_ranking(ranking):
        chosen, rejected = item.candidates[better], item.candidates[worse]
        if chosen == rejected:
            continue
        row = {"prompt": item.prompt, "chosen": chosen, "rejected": rejected, "source": "human"}
        if item.id is not None:
            row["id"] = item.id
        row["rank_chosen"], row["rank_rejected"] = rank[better], rank[worse]
        rows.append(row)
    return rows


def identical_groups(candidates: tuple[str, ...] | list[str]) -> list[list[int]]:
    """Indices of candidates sharing one text, groups of two or more: ["a", "b", "a"] -> [[0, 2]]."""
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(candidates):
        groups.setdefault(text, []).append(i)
    return [group for group in groups.values() if len(group) > 1]


def layout(candidates: tuple[str, ...] | list[str], width: int) -> list[str]:
    """Screen lines showing the candidates: in labelled columns when each gets MIN_COLUMN
    characters of `width`, else stacked, each under its label. No line exceeds `width`."""
    n = len(candidates)
    column = (width - len(GUTTER) * (n - 1)) // n
    if column >= MIN_COLUMN:
        cells = [[f"[{LABELS[i]}]", *wrap(text, column)] for i, text in enumerate(candidates)]
        return [GUTTER.join(cell.ljust(column) for cell in row).rstrip()
                for row in zip_longest(*cells, fillvalue="")]
    lines: list[str] = []
    for i, text in enumerate(candidates):
        body = wrap(text, max(width - 4, 1))
        lines += [f"[{LABELS[i]}] {body[0]}".rstrip(), *(f"    {line}" for line in body[1:]), ""]
    return lines[:-1]


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters; newlines and each line's indentation are kept."""
    text = printable(text.replace("\r\n", "\n").expandtabs(4), keep="\n", replace="?")
    if not text.strip():
        return ["(empty)"]
    lines: list[str] = []
    for paragraph in text.split("\n"):
        # Keep indentation (code, lists) but never so much that no text fits beside it.
        indent = paragraph[: len(paragraph) - len(paragraph.lstrip(" "))][: width // 2]
        lines += textwrap.wrap(paragraph.lstrip(" "), width, initial_indent=indent,
                               subsequent_indent=indent) or [""]
    return lines


def render_item(item: Item, position: int, total: int, width: int, status: str = "") -> list[str]:
    """The screen of one item: progress, prompt, candidates and a note on identical texts."""
    lines = [f"item {position + 1}/{total}   ({printable(item.origin, keep='')}{status})", "",
             "PROMPT"]
    prompt = item.prompt if isinstance(item.prompt, str) else "\n".join(
        f"{m['role']}: {m['content']}" for m in item.prompt)
    lines += [f"  {line}" for line in wrap(prompt, max(width - 2, 1))]
    lines += ["", "CANDIDATES", *layout(item.candidates, width)]
    for group in identical_groups(item.candidates):
        lines += ["", f"note: {_names(group)} are identical: rank them next to each other "
                  "(pairs between them are not written)"]
    return lines


def example(n: int) -> str:
    return " ".join([LABELS[1], LABELS[0], *LABELS[2:n]])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _names(group: list[int]) -> str:
    names = [LABELS[i] for i in group]
    return f"{', '.join(names[:-1])} and {names[-1]}"


# ---- input and on-disk state ----------------------------------------------------------------


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
    import random

    from prefalign.errors import ConfigError

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


def load_progress(progress: Path, output: Path, items: list[Item]) -> list[dict]:
    """The decisions recorded in the sidecar, checked against the input rows."""
    if not progress.exists():
        if output.exists() and output.stat().st_size > 0:
            raise DataError(f"{output}: already exists and has no {progress.name} beside it; "
                            "choose another --output or move the file away")
        return []
    try:
        state = json.loads(progress.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{progress}: cannot read the annotation record ({e})") from None
    if not isinstance(state, dict) or state.get("format") != PROGRESS_FORMAT or not isinstance(
        state.get("decisions"), list
    ):
        raise DataError(f"{progress}: not a prefalign annotate record")
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


def save(output: Path, progress: Path, items: list[Item], decisions: list[dict],
         input_name: str) -> None:
    """Write the sidecar, then rebuild OUTPUT from it."""
    body = ",\n".join(json.dumps(d, ensure_ascii=False) for d in decisions)
    _write_atomic(progress, f'{{"format": "{PROGRESS_FORMAT}", "input": '
                            f'{json.dumps(input_name)}, "decisions": [\n{body}\n]}}\n')
    rows = all_pairs(items, decisions)
    _write_atomic(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def all_pairs(items: list[Item], decisions: list[dict]) -> list[dict]:
    """The output rows of every ranked item, in input order."""
    return [row for item, decision in zip(items, decisions) if not decision.get("skipped")
            for row in pair_rows(item, [LABELS.index(label) for label in decision["ranking"]])]


def _write_atomic(path: Path, text: str) -> None:
    # A rename replaces the file whole, so a reader (or a crash) never sees half of it; a
    # full disk or read-only folder leaves the earlier file and no temp file behind.
    with atomic_file(path, "w", KEPT, "--output") as handle:
        handle.write(text)


# ---- the session ----------------------------------------------------------------------------


def annotate(input_path: str | os.PathLike, output_path: str | os.PathLike,
             stdin: TextIO | None = None, stdout: TextIO | None = None,
             width: int | None = None, select: str = "all", limit: int | None = None,
             judgments: str | os.PathLike | None = None, seed: int = 0) -> Summary:
    """Rank the candidates of every row of `input_path` interactively (see the module doc).

    `width` defaults to the terminal's, read for every item so a resized window takes effect.
    A bad row or progress record raises DataError before anything is asked; Ctrl-C saves and
    re-raises KeyboardInterrupt.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    items = select_items(read_items(input_path), select, limit, judgments, seed)
    output = Path(output_path)
    progress = Path(str(output) + PROGRESS_SUFFIX)
    with writing(output, KEPT, "--output"):
        output.parent.mkdir(parents=True, exist_ok=True)
    decisions = load_progress(progress, output, items)
    input_name = str(input_path)
    save(output, progress, items, decisions, input_name)
    message = f"resuming: {len(decisions)} of {len(items)} items done" if decisions else ""
    try:
        _session(items, decisions, stdin, stdout, width, message,
                 lambda: save(output, progress, items, decisions, input_name))
    except KeyboardInterrupt:
        # Ctrl-C may land between writing the sidecar and the output: write both again.
        save(output, progress, items, decisions, input_name)
        stdout.write(f"\n{_closing(items, decisions, output)}\n")
        stdout.flush()
        raise
    stdout.write(f"{_closing(items, decisions, output)}\n")
    stdout.flush()
    return _summary(items, decisions)


def _session(items, decisions, stdin, stdout, width, message, persist) -> None:
    """The read-eval loop; mutates `decisions` and calls persist() after every change."""
    redraw = True
    while True:
        position = len(decisions)
        done = position >= len(items)
        if redraw:
            _draw(stdout, items, decisions, message, width)
            redraw, message = False, ""
        n = 0 if done else len(items[position].candidates)
        stdout.write("u undo the last item, Enter or q quit\n> " if done else
                     f"ranking, best first (e.g. {example(n)}); s skip, u undo, q quit, ? help\n> ")
        stdout.flush()
        line = stdin.readline()
        command = line.strip().lower()
        if not line or command in ("q", "quit") or (done and not command):
            stdout.write("" if line else "\n")  # after Ctrl-D the cursor is still on the prompt
            return
        if command in ("?", "h", "help"):
            stdout.write(HELP)
        elif command in ("u", "undo") and not decisions:
            stdout.write("nothing to undo\n")
        elif command in ("u", "undo"):
            decisions.pop()
            persist()
            redraw, message = True, f"undid item {len(decisions) + 1}; its pairs are removed"
        elif done:
            stdout.write("all items are done: u undoes the last one, Enter or q quits\n")
        else:
            try:
                decision, message = decide(command, items[position], position)
            except ValueError as e:
                stdout.write(f"{e}\n")
                continue
            decisions.append(decision)
            persist()
            redraw = True


def decide(command: str, item: Item, position: int) -> tuple[dict, str]:
    """`s` or a ranking typed for `item` -> (the decision to record, a one-line note).
    A refused ranking raises ValueError with the message to show."""
    decision = {"origin": item.origin, "key": item.key}
    if command in ("s", "skip"):
        return {**decision, "skipped": True}, f"skipped item {position + 1}"
    ranking = parse_ranking(command, len(item.candidates))
    check_identical_adjacent(ranking, item.candidates)
    written = len(pair_rows(item, ranking))
    left_out = len(pairs_from_ranking(ranking)) - written
    note = f" ({left_out} of identical texts left out)" if left_out else ""
    return ({**decision, "ranking": [LABELS[i] for i in ranking]},
            f"item {position + 1}: {_count(written, 'pair')} written{note}")


def _draw(stdout, items, decisions, message, width) -> None:
    columns = max(width or shutil.get_terminal_size().columns, MIN_COLUMN + 4)
    position, s = len(decisions), _summary(items, decisions)
    lines = [message, ""] if message else []
    if s.finished:
        lines += [f"all {s.items} items are done: {s.ranked} ranked, {s.skipped} skipped"]
    else:
        status = f"; {s.ranked} ranked, {s.skipped} skipped so far"
        lines += render_item(items[position], position, s.items, columns, status)
    clear = _CLEAR if stdout.isatty() else ""
    stdout.write(clear + "\n".join(lines) + "\n\n")


def _summary(items, decisions) -> Summary:
    ranked = sum(not d.get("skipped") for d in decisions)
    return Summary(len(items), ranked, len(decisions) - ranked, len(all_pairs(items, decisions)),
                   len(decisions) == len(items))


def _closing(items, decisions, output) -> str:
    s = _summary(items, decisions)
    counts = (f"{s.ranked} ranked, {s.skipped} skipped; {_count(s.pairs, 'pair')} in "
              f"{printable(str(output), keep='')}")
    if s.finished:
        return f"done: {_count(s.items, 'item')} ({counts})"
    return (f"progress saved: {len(decisions)} of {s.items} items done ({counts}); "
            "run the same command again to continue")


# ---- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="rows with prompt and candidates (JSONL, JSON, Parquet, ...)")
    parser.add_argument("--output", required=True,
                        help="JSONL of preference pairs; OUTPUT.progress.json records progress")
    parser.add_argument("--select", choices=("all", "random", "uncertain"), default="all",
                        help="items to ask about: all; random (seeded by --seed); uncertain: "
                        "where a pairwise judge flipped most or was least confident, read "
                        "from --judgments (default: all)")
    parser.add_argument("--limit", type=int, help="ask about at most this many items")
    parser.add_argument("--judgments", help="OUTPUT.judgments.jsonl of `prefalign judge --mode "
                        "pairwise` run on this same input (for --select uncertain)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --select random "
                        "(default: 0)")


def run(args: argparse.Namespace) -> int:
    annotate(args.input, args.output, select=args.select, limit=args.limit,
             judgments=args.judgments, seed=args.seed)
    return 0


DESCRIPTION = ("Rank each prompt's candidate completions by hand, best first, and write every "
               "pair the ranking implies. Progress is saved after every item; the same command "
               "again continues where it stopped.")
