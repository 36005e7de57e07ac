"""Rank candidate completions by hand and write every pair a ranking implies: in the
terminal, or on a local web page for several annotators at once (`--serve`).

    prefalign annotate --input candidates.jsonl --output human.jsonl
    prefalign annotate --input candidates.jsonl --output human.jsonl --serve --overlap 0.2

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

OUTPUT.progress.json (record.py) is the whole state. After every decision it, then OUTPUT,
is rewritten whole (temporary file, fsync, rename), and OUTPUT is rebuilt from it at every
start: a session stopped at any moment resumes at the first undecided row with nothing lost
or duplicated, `u` can undo the last decision of an earlier session, and rows appended to
the input later are picked up. `key` hashes the row's prompt and candidates, so an edited
input is reported rather than matched with old decisions.

With --serve (server.py, team.py, page.html) each annotator has their own OUTPUT and record
(human.jsonl -> human.alice.jsonl), the same format plus ties (A=B: no pair between them), a
`strength` (slightly or clearly better) for items of two candidates, and `annotator` on
every pair row.
"""

from prefalign.preferences.annotate.command import DESCRIPTION, AnnotateConfig, run_annotate
from prefalign.preferences.annotate.ranking import (
    LABELS,
    Item,
    check_identical_adjacent,
    identical_groups,
    pair_rows,
    pairs_from_ranking,
    parse_groups,
    parse_ranking,
    read_items,
    select_items,
)
from prefalign.preferences.annotate.record import Summary, load_progress, save
from prefalign.preferences.annotate.terminal import annotate, layout, render_item, wrap

__all__ = ["DESCRIPTION", "LABELS", "AnnotateConfig", "Item", "Summary", "annotate",
           "check_identical_adjacent", "identical_groups", "layout", "load_progress",
           "pair_rows", "pairs_from_ranking", "parse_groups", "parse_ranking", "read_items",
           "render_item", "run_annotate", "save", "select_items", "wrap"]
