"""The terminal annotator: one item per screen, a typed ranking per item (see the package
doc for the keys and the files)."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from itertools import zip_longest
from pathlib import Path
from typing import TextIO

from prefalign.errors import writing
from prefalign.preferences.annotate.ranking import (
    LABELS,
    Item,
    _count,
    _names,
    check_identical_adjacent,
    example,
    identical_groups,
    pair_rows,
    pairs_from_ranking,
    parse_ranking,
    read_items,
    select_items,
)
from prefalign.preferences.annotate.record import (
    KEPT,
    Summary,
    load_progress,
    progress_path,
    save,
    summarize,
)
from prefalign.text import printable

# Below this a column holds two or three words per line and is harder to read than a stack.
MIN_COLUMN = 20
GUTTER = " | "
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


def annotate(input_path: str | os.PathLike, output_path: str | os.PathLike,
             stdin: TextIO | None = None, stdout: TextIO | None = None,
             width: int | None = None, select: str = "all", limit: int | None = None,
             judgments: str | os.PathLike | None = None, seed: int = 0) -> Summary:
    """Rank the candidates of every row of `input_path` interactively (see the package doc).

    `width` defaults to the terminal's, read for every item so a resized window takes effect.
    A bad row or progress record raises DataError before anything is asked; Ctrl-C saves and
    re-raises KeyboardInterrupt.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    items = select_items(read_items(input_path), select, limit, judgments, seed)
    output = Path(output_path)
    progress = progress_path(output)
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
    return summarize(items, decisions)


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
    position, s = len(decisions), summarize(items, decisions)
    lines = [message, ""] if message else []
    if s.finished:
        lines += [f"all {s.items} items are done: {s.ranked} ranked, {s.skipped} skipped"]
    else:
        status = f"; {s.ranked} ranked, {s.skipped} skipped so far"
        lines += render_item(items[position], position, s.items, columns, status)
    clear = _CLEAR if stdout.isatty() else ""
    stdout.write(clear + "\n".join(lines) + "\n\n")


def _closing(items, decisions, output) -> str:
    s = summarize(items, decisions)
    counts = (f"{s.ranked} ranked, {s.skipped} skipped; {_count(s.pairs, 'pair')} in "
              f"{printable(str(output), keep='')}")
    if s.finished:
        return f"done: {_count(s.items, 'item')} ({counts})"
    return (f"progress saved: {len(decisions)} of {s.items} items done ({counts}); "
            "run the same command again to continue")
