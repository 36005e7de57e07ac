"""prefalign annotate: pure ranking/pair/layout functions, saved state, and whole sessions
typed into a real pseudo-terminal (rank, bad entry, skip, undo, q, Ctrl-C, Ctrl-D,
restart, finish). Each launch imports torch through prefalign.data: three launches only."""

import codecs
import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

import pytest

from helpers import write_jsonl
from prefalign.cli import main
from prefalign.errors import DataError
from prefalign.preferences.annotate import (
    Item,
    annotate,
    check_identical_adjacent,
    identical_groups,
    layout,
    pair_rows,
    pairs_from_ranking,
    parse_ranking,
    read_items,
    render_item,
    select_items,
    wrap,
)
from prefalign.preferences.judge import judge_preferences, load_template

LAUNCH = "import sys; from prefalign.cli import main; sys.exit(main(['annotate', *sys.argv[1:]]))"
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ---- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["C A B D", "c,a,b,d", "cabd", "C>A>B>D", "  c, a  b,d \n"])
def test_parse_ranking_accepts_separators_and_any_case(text):
    assert parse_ranking(text, 4) == [2, 0, 1, 3]


@pytest.mark.parametrize(
    ("text", "n", "message"),
    [
        ("c a", 3, "missing B: rank all 3 candidates"),
        ("a b c d", 3, "unknown label D: this item has A-C"),
        ("b a a", 2, "A appears twice"),
        ("a=b c", 3, "ties are not supported"),
        ("a b 3", 3, "unexpected '3'"),
        ("", 2, "type a ranking, best first, e.g. B A"),
    ],
)
def test_parse_ranking_says_what_is_wrong(text, n, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_ranking(text, n)


def test_pairs_from_ranking_lists_every_implied_pair_best_first():
    # C A B D = [2, 0, 1, 3]: C>A, C>B, C>D, A>B, A>D, B>D; n(n-1)/2 = 6 pairs.
    assert pairs_from_ranking([2, 0, 1, 3]) == [(2, 0), (2, 1), (2, 3), (0, 1), (0, 3), (1, 3)]
    assert pairs_from_ranking([1, 0]) == [(1, 0)]


def test_pair_rows_carry_ranks_and_id_and_leave_out_identical_texts():
    item = Item("Q", ("x", "y", "x"), "f.jsonl:1", id=7)
    # ranking B A C: B>A (ranks 1, 2), B>C (1, 3), A>C is "x" vs "x" and is left out.
    assert pair_rows(item, [1, 0, 2]) == [
        {"prompt": "Q", "chosen": "y", "rejected": "x", "source": "human", "id": 7,
         "rank_chosen": 1, "rank_rejected": 2},
        {"prompt": "Q", "chosen": "y", "rejected": "x", "source": "human", "id": 7,
         "rank_chosen": 1, "rank_rejected": 3},
    ]
    assert "id" not in pair_rows(Item("Q", ("a", "b"), "f.jsonl:1"), [0, 1])[0]


def test_identical_candidates_must_be_ranked_next_to_each_other():
    check_identical_adjacent([3, 0, 2, 1], ("x", "y", "z", "x"))  # D A C B: fine
    with pytest.raises(ValueError, match="A and D are identical: rank them next to each other"):
        check_identical_adjacent([3, 2, 0, 1], ("x", "y", "z", "x"))  # D C A B: split


def test_identical_groups():
    assert identical_groups(["a", "b", "a", "c", "b", "a"]) == [[0, 2, 5], [1, 4]]
    assert identical_groups(["a", "b"]) == []


def test_layout_puts_candidates_side_by_side_when_wide_enough():
    lines = layout(["Apple pie is a classic dessert " * 3, "Brick", "Cherry"], 80)
    assert lines[0].split() == ["[A]", "|", "[B]", "|", "[C]"]
    assert lines[1].split("|")[1].strip() == "Brick"
    assert len(lines) > 3 and all(len(line) <= 80 for line in lines)  # A wraps in its column


def test_layout_stacks_candidates_when_columns_would_be_too_narrow():
    lines = layout(["one two three four five six seven", "Brick", "Cherry"], 40)
    assert lines == ["[A] one two three four five six seven", "", "[B] Brick", "", "[C] Cherry"]
    many = layout([f"text {i}" for i in range(26)], 200)  # 26 columns never fit
    assert many[0] == "[A] text 0" and many[-1] == "[Z] text 25"


def test_wrap_keeps_newlines_and_indentation_and_defuses_escape_codes():
    assert wrap("def f():\n    return 1\n\nend", 20) == ["def f():", "    return 1", "", "end"]
    assert wrap("a\x1b[2Jb", 20) == ["a?[2Jb"]
    assert wrap("   ", 20) == ["(empty)"]
    assert all(len(line) <= 10 for line in wrap("x" * 35, 10))


def test_render_item_shows_progress_chat_prompts_and_identical_candidates():
    prompt = [{"role": "user", "content": "Hi?"}]
    lines = render_item(Item(prompt, ("a", "b", "a"), "f.jsonl:4"), 2, 20, 100)
    assert lines[0].startswith("item 3/20   (f.jsonl:4")
    assert "  user: Hi?" in lines
    assert lines[-1].startswith("note: A and C are identical")


# ---- input checks and saved state ------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Q"}, "in.jsonl:2: no candidates field"),
        ({"candidates": ["a", "b"]}, "in.jsonl:2: no prompt field"),
        ({"prompt": "Q", "candidates": ["only"]}, "in.jsonl:2: 1 candidates; ranking needs 2"),
        ({"prompt": "Q", "candidates": list("abcdefghijklmnopqrstuvwxyz0")}, "27 candidates"),
        ({"prompt": "Q", "candidates": "a b"}, "in.jsonl:2: candidates must be a list of strings"),
    ],
)
def test_bad_rows_stop_before_anything_is_asked(tmp_path, row, message):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q", "candidates": ["a", "b"]}, row])
    out = io.StringIO()
    with pytest.raises(DataError, match=re.escape(message)):
        annotate(path, tmp_path / "out.jsonl", stdin=io.StringIO("a b\n"), stdout=out)
    assert out.getvalue() == "" and not (tmp_path / "out.jsonl").exists()


def test_main_reports_a_bad_row_on_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q", "candidates": ["a"]}])
    assert main(["annotate", "--input", path, "--output", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_an_existing_output_without_progress_record_is_never_overwritten(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q", "candidates": ["a", "b"]}])
    (tmp_path / "out.jsonl").write_text('{"keep": 1}\n')
    with pytest.raises(DataError, match="already exists and has no out.jsonl.progress.json"):
        annotate(path, tmp_path / "out.jsonl", stdin=io.StringIO(""), stdout=io.StringIO())
    assert (tmp_path / "out.jsonl").read_text() == '{"keep": 1}\n'


def test_a_changed_input_is_reported_not_paired_with_old_decisions(tmp_path):
    rows = [{"prompt": "Q", "candidates": ["a", "b"]}, {"prompt": "R", "candidates": ["c", "d"]}]
    path, output = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    annotate(path, output, stdin=io.StringIO("b a\nb a\n"), stdout=io.StringIO(), width=80)
    rows[1]["candidates"] = ["c", "e"]
    write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(DataError, match=r"in.jsonl:2: not the row ranked as item 2"):
        annotate(path, output, stdin=io.StringIO(""), stdout=io.StringIO())


def test_session_without_a_terminal(tmp_path):
    rows = [{"prompt": "Q", "candidates": ["same", "same"]}, {"prompt": "R", "candidates": ["c", "d"]}]
    path, output = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    out = io.StringIO()
    summary = annotate(path, output, stdin=io.StringIO("u\nb a\nq\n"), stdout=out, width=80)
    text = out.getvalue()
    assert "\x1b" not in text  # no screen clearing when the output is not a terminal
    assert "nothing to undo" in text
    assert "item 1: 0 pairs written (1 of identical texts left out)" in text
    assert (summary.ranked, summary.skipped, summary.pairs, summary.finished) == (1, 0, 0, False)
    assert output.read_text() == ""
    # A second run resumes at item 2; rows appended to the input meanwhile are picked up.
    write_jsonl(tmp_path / "in.jsonl", [*rows, {"prompt": "S", "candidates": ["e", "f"]}])
    summary = annotate(path, output, stdin=io.StringIO("a b\nb,a\n\n"), stdout=out, width=80)
    assert (summary.items, summary.ranked, summary.pairs, summary.finished) == (3, 3, 2, True)
    assert [(r["chosen"], r["rejected"]) for r in map(json.loads, output.open())] == [
        ("c", "d"), ("f", "e")]


# ---- whole sessions in a pseudo-terminal ------------------------------------------------------


class Terminal:
    """`prefalign annotate ARGS` on a pseudo-terminal of a fixed size: type keys, read the
    screen (escape codes and carriage returns removed)."""

    def __init__(self, args, columns=120, rows=40):
        pid, fd = pty.fork()
        if pid == 0:  # the child: set the window size, then become the program
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
                env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
                os.execve(sys.executable, [sys.executable, "-c", LAUNCH, *args], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.raw, self.seen, self.closed = "", 0, False

    def _read(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the program exited and the terminal is closed
            chunk = b""
        self.closed = not chunk
        self.raw += self.decoder.decode(chunk)

    def screen(self):
        return ESCAPES.sub("", self.raw).replace("\r", "")

    def expect(self, text, timeout=20):
        """Wait until `text` appears; return everything shown since the previous expect."""
        deadline = time.monotonic() + timeout
        while text not in self.screen()[self.seen:]:
            if self.closed or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared; the screen:\n{self.screen()}")
            self._read(deadline - time.monotonic())
        end = self.screen().index(text, self.seen) + len(text)
        shown, self.seen = self.screen()[self.seen:end], end
        return shown

    def type(self, keys):
        os.write(self.fd, keys.encode())

    def finish(self, timeout=20):
        """Wait for the program to exit -> (exit code, what it showed since the last expect)."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.pid = None
        return os.waitstatus_to_exitcode(status), self.screen()[self.seen:]

    def kill(self):
        """Stop a program a failed test left waiting for keys."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)


@pytest.fixture
def terminal():
    started = []

    def start(*args, **kwargs):
        started.append(Terminal(*args, **kwargs))
        return started[-1]

    yield start
    for term in started:
        term.kill()


def test_annotate_in_a_terminal_across_restarts(tmp_path, terminal):
    rows = [
        {"id": "p1", "prompt": "Name a fruit.", "candidates": ["Apple", "Brick", "Cherry"],
         "scores": [1.0, 0.0, 1.0], "source": "sampled"},
        {"id": "p2", "prompt": "Greet me.", "candidates": ["Hello", "Go away", "Hi there", "Hello"]},
        {"id": 3, "prompt": "Pick a number.", "candidates": ["One", "Two"]},
        {"prompt": "Describe the sea.", "candidates": ["Blue and wide.", "Wet."]},
    ]
    source, output = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    args = ["--input", source, "--output", str(output)]

    term = terminal(args, columns=120)
    shown = term.expect("> ")
    assert "item 1/4" in shown and "Name a fruit." in shown
    assert any(all(w in line for w in ("Apple", "Brick", "Cherry")) for line in shown.split("\n"))
    term.type("c a\r")
    term.expect("missing B: rank all 3 candidates, best first")
    term.type("c,a,b\r")
    assert "item 1: 3 pairs written" in term.expect("item 2/4")
    assert "note: A and D are identical" in term.expect("> ")
    term.type("a b c e\r")
    term.expect("unknown label E: this item has A-D")
    term.type("d c a b\r")
    term.expect("A and D are identical: rank them next to each other")
    term.type("d a c b\r")
    assert "5 pairs written (1 of identical texts left out)" in term.expect("item 3/4")
    term.type("s\r")
    term.expect("item 4/4")
    term.type("u\r")
    assert "undid item 3" in term.expect("item 3/4")
    term.type("B>A\r")
    term.expect("item 4/4")
    term.expect("> ")
    term.type("q\r")
    code, shown = term.finish()
    assert code == 0
    assert "progress saved: 3 of 4 items done (3 ranked, 0 skipped; 9 pairs in" in shown
    assert len(output.read_text().splitlines()) == 9

    # Narrow terminal: candidates stacked. Undo reaches back into the previous session.
    term = terminal(args, columns=40)
    shown = term.expect("> ")
    assert "resuming: 3 of 4 items done" in shown and "item 4/4" in shown
    assert "[A] Blue and wide.\n\n[B] Wet." in shown
    term.type("u\r")
    term.expect("item 3/4")
    term.type("s\r")
    term.expect("item 4/4")
    term.expect("> ")
    term.type("\x03")  # Ctrl-C
    code, shown = term.finish()
    assert code == 130 and "prefalign: interrupted" in shown
    assert "progress saved: 3 of 4 items done (2 ranked, 1 skipped; 8 pairs" in shown

    # Ctrl-D at the final screen ends a finished session like Enter or q.
    term = terminal(args)
    term.expect("item 4/4")
    term.expect("> ")
    term.type("?\r")
    term.expect("u  undo: go back one item")
    term.type("a b\r")
    term.expect("all 4 items are done: 3 ranked, 1 skipped")
    term.expect("> ")
    term.type("\x04")  # Ctrl-D
    code, shown = term.finish()
    assert code == 0 and "done: 4 items (3 ranked, 1 skipped; 9 pairs in" in shown

    def pair(row, chosen, rejected, ranks):
        extra = {"id": row["id"]} if "id" in row else {}
        return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                "source": "human", **extra, "rank_chosen": ranks[0], "rank_rejected": ranks[1]}

    r1, r2, _, r4 = rows
    assert [json.loads(line) for line in output.read_text().splitlines()] == [
        pair(r1, "Cherry", "Apple", (1, 2)), pair(r1, "Cherry", "Brick", (1, 3)),
        pair(r1, "Apple", "Brick", (2, 3)),
        # D A C B with A == D ("Hello"): D>A is left out.
        pair(r2, "Hello", "Hi there", (1, 3)), pair(r2, "Hello", "Go away", (1, 4)),
        pair(r2, "Hello", "Hi there", (2, 3)), pair(r2, "Hello", "Go away", (2, 4)),
        pair(r2, "Hi there", "Go away", (3, 4)),
        pair(r4, "Blue and wide.", "Wet.", (1, 2)),
    ]
    record = json.loads((tmp_path / "out.jsonl.progress.json").read_text())
    assert [d.get("ranking") or "skipped" for d in record["decisions"]] == [
        ["C", "A", "B"], ["D", "A", "C", "B"], "skipped", ["A", "B"]]
    assert [d["origin"] for d in record["decisions"]] == [f"{source}:{i}" for i in (1, 2, 3, 4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl", "out.jsonl", "out.jsonl.progress.json"]


# ---- choosing what to annotate ----------------------------------------------------------------


def test_select_uncertain_asks_where_a_pairwise_judge_flipped_or_doubted(tmp_path, capsys):
    rows = [{"prompt": f"Q{i}", "candidates": [f"good{i}", f"bad{i}"]} for i in range(5)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)

    class Judge:  # prefers whatever sits first on items 1 and 3, "good" elsewhere
        name, settings = "j", {"judge": "j"}

        def __call__(self, texts, attempt):
            first = [t.split("Response 0:\n")[1].split()[0] for t in texts]
            return ["0" if f[-1] in "13" or f.startswith("good") else "1" for f in first]

    judge_preferences(path, tmp_path / "judged.jsonl", Judge(), load_template(None, "pairwise"),
                      mode="pairwise", progress=False)
    judgments = str(tmp_path / "judged.judgments.jsonl")
    output = tmp_path / "human.jsonl"
    out = io.StringIO()
    summary = annotate(path, output, stdin=io.StringIO("a b\na b\n"), stdout=out, width=80,
                       select="uncertain", limit=2, judgments=judgments)
    assert summary.items == 2 and "Q1" in out.getvalue() and "Q3" in out.getvalue()
    assert "Q0" not in out.getvalue()
    assert [(r["prompt"], r["chosen"]) for r in map(json.loads, output.open())] == [
        ("Q1", "good1"), ("Q3", "good3")]
    # Among consistent items, the least confident comes first.
    records = [{"index": i, "origin": f"{path}:{i + 1}", "status": "judged", "flip_rate": 0.0,
                "pairs": [{"confidence": c}]} for i, c in enumerate([0.9, 0.6, 0.99, 0.7, 0.8])]
    confident = write_jsonl(tmp_path / "conf.jsonl", records)
    chosen = select_items(read_items(path), "uncertain", 3, confident)
    assert [item.prompt for item in chosen] == ["Q1", "Q3", "Q4"]
    assert main(["annotate", "--input", path, "--output", str(tmp_path / "x.jsonl"),
                 "--select", "uncertain"]) == 2
    assert "--select uncertain needs --judgments" in capsys.readouterr().err
    other = write_jsonl(tmp_path / "other.jsonl", [{**records[0], "index": 7}])
    with pytest.raises(DataError, match="other.jsonl:1: 'index' 7 is not a row"):
        select_items(read_items(path), "uncertain", 3, other)


def test_select_random_is_seeded():
    items = [Item(f"Q{i}", ("a", "b"), f"in.jsonl:{i + 1}") for i in range(20)]
    first = select_items(items, "random", 5, seed=1)
    assert len(first) == 5 and first == select_items(items, "random", 5, seed=1)
    assert first != select_items(items, "random", 5, seed=2)
    assert first == sorted(first, key=items.index)  # asked in input order
    assert select_items(items, "all", 3) == items[:3]
