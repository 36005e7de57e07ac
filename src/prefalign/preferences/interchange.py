"""`prefalign data export` and `data import`: preference labels to and from Argilla and Label
Studio, and pairs out in TRL's preference format (docs/annotation-formats.md shows each).

Both tools hold the same thing prefalign does: a prompt, its candidates, and each
annotator's ranking of them. Inside, that is a Task. Export reads

- candidates rows (`prompt`, `candidates`, as `generate --keep-candidates` writes): tasks
  to annotate, without labels;
- label rows (`prompt`, `chosen`, `rejected`, `annotator`?, as `annotate` writes): per
  prompt, when every annotator's pairs rank all its texts (a complete, consistent set of
  pairs, which a ranking without ties in `annotate` writes), one task with each
  annotator's ranking; else one two-candidate task per pair. Neither tool's ranking holds
  ties: a tie (equal ranks, no row) is left out, and counted in what export prints.

Import writes label rows: every pair each ranking implies, with `annotator`, `rank_chosen`
and `rank_rejected` (tied candidates make no pair), ready for `data agreement` and
`data merge --agreement`. TRL export writes `prompt`, `chosen`, `rejected` (and `id`) of
any preference data prefalign reads; conversational rows keep their messages.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from prefalign.config import Section, option, require
from prefalign.errors import ConfigError, DataError, atomic_file
from prefalign.text import printable

FORMATS = ("argilla", "label-studio", "trl")
EXPORT_DESCRIPTION = ("Write candidates or human labels as Argilla records or Label Studio "
                      "tasks (rankings, with each annotator's labels), or preference pairs in "
                      "TRL's format.")
IMPORT_DESCRIPTION = ("Read Argilla records or a Label Studio export of a ranking or pairwise "
                      "task and write label rows (one per implied pair, with the annotator) "
                      "for data agreement and data merge.")
SOURCE = "human"


@dataclass
class Task:
    """One item: `rankings` holds (annotator, ranks), ranks[i] the place of candidates[i]
    (1 = best; equal places are a tie)."""

    prompt: Any
    candidates: list[str]
    id: Any = None
    rankings: list[tuple[str, list[int]]] = field(default_factory=list)


# ---- prefalign rows -> tasks -----------------------------------------------------------------


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def tasks_from_rows(rows: list) -> list[Task]:
    """Tasks of candidates rows and label rows (see the module docstring), in input order."""
    tasks: list[Task] = []
    groups: dict[str, dict] = {}  # prompt -> its label rows, at the place of the first
    for data, origin in rows:
        if not isinstance(data, dict):
            raise DataError(f"{origin}: expected a JSON object")
        if "candidates" in data:
            tasks.append(_candidates_task(data, origin))
            continue
        from prefalign.preferences.labels import parse_vote

        vote = parse_vote(data, origin, "annotator")
        if vote is None:
            continue  # identical texts: no preference to move
        group = groups.get(vote.item)
        if group is None:
            group = groups[vote.item] = {"prompt": vote.prompt, "id": vote.id, "texts": {},
                                         "votes": {}}
            tasks.append(group)  # replaced by its tasks below, in place
        for text in vote.texts:
            group["texts"].setdefault(text, None)
        chosen = vote.texts[vote.choice]
        pairs = group["votes"].setdefault(vote.annotator, {})
        if pairs.get(vote.texts, chosen) != chosen:
            raise DataError(f"{origin}: {vote.annotator} labels this pair both ways; remove "
                            "one of the two rows")
        pairs[vote.texts] = chosen
    return [t for entry in tasks for t in (
        [entry] if isinstance(entry, Task) else _group_tasks(entry))]


def _candidates_task(data: dict, origin: str) -> Task:
    prompt, candidates = data.get("prompt"), data["candidates"]
    check_prompt(prompt, origin)
    if not isinstance(candidates, list) or len(candidates) < 2 or not all(
            isinstance(c, str) for c in candidates):
        raise DataError(f"{origin}: candidates must be a list of two or more strings")
    return Task(prompt, list(candidates), data.get("id"))


def task_prompt(fields: dict, prompt_field: str, origin: str, key: str = "field") -> Any:
    """The prompt of an imported task, checked; `key` is what the format calls a field."""
    if prompt_field not in fields:
        raise DataError(f"{origin}: no {key} {prompt_field!r} ({key.split()[-1]}s: "
                        f"{printable(', '.join(map(str, fields)))[:80]}); name the prompt "
                        f"{key.split()[-1]} with --prompt-field")
    check_prompt(fields[prompt_field], origin)
    return fields[prompt_field]


def check_prompt(prompt: Any, origin: str) -> None:
    if not isinstance(prompt, str) and not (
            isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in prompt)):
        raise DataError(f"{origin}: the prompt must be text or a list of {{role, content}} "
                        "messages")


def _group_tasks(group: dict) -> list[Task]:
    texts = list(group["texts"])
    rankings = [(who, _ranks(pairs, texts)) for who, pairs in group["votes"].items()]
    if all(ranks is not None for _, ranks in rankings):
        return [Task(group["prompt"], texts, group["id"], rankings)]
    tasks: dict[tuple, Task] = {}
    for who, pairs in group["votes"].items():
        for (a, b), chosen in pairs.items():
            task = tasks.setdefault((a, b), Task(group["prompt"], [a, b], group["id"]))
            task.rankings.append((who, [1, 2] if chosen == a else [2, 1]))
    return list(tasks.values())


def _ranks(pairs: dict[tuple, str], texts: list[str]) -> list[int] | None:
    """Each text's place when `pairs` rank all `texts` consistently (every pair labelled,
    no cycle), else None."""
    k = len(texts)
    if len(pairs) != k * (k - 1) // 2:
        return None
    wins = dict.fromkeys(texts, 0)
    for chosen in pairs.values():
        wins[chosen] += 1
    if sorted(wins.values()) != list(range(k)):
        return None  # a cycle: a > b > c > a gives every text one win
    return [k - wins[text] for text in texts]


# ---- tasks -> label rows ---------------------------------------------------------------------


def label_rows(task: Task, annotator: str, ranks: list[int]) -> list[dict]:
    """The pair rows of one annotator's ranking of `task`: every two candidates with
    different places, better first; pairs of identical texts are left out."""
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    rows = []
    for i, better in enumerate(order):
        for worse in order[i + 1:]:
            chosen, rejected = task.candidates[better], task.candidates[worse]
            if ranks[better] == ranks[worse] or chosen == rejected:
                continue
            row = {"prompt": task.prompt, "chosen": chosen, "rejected": rejected,
                   "source": SOURCE}
            if task.id is not None:
                row["id"] = task.id
            row.update(rank_chosen=ranks[better], rank_rejected=ranks[worse],
                       annotator=annotator)
            rows.append(row)
    return rows


def check_ranks(ranks: Any, n: int, origin: str) -> list[int]:
    if not isinstance(ranks, list) or len(ranks) != n or not all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= n for r in ranks):
        raise DataError(f"{origin}: the ranking does not place each of the {n} candidates "
                        "exactly once")
    return ranks


# ---- TRL ---------------------------------------------------------------------------------------


def trl_rows(rows: list) -> tuple[list[dict], int]:
    """TRL's explicit-prompt preference rows of any preference data, and how many rows had
    a weight other than 1 (TRL's format has no weight column)."""
    from prefalign.data.formats import normalize_rows

    examples, report = normalize_rows(rows)
    if not examples:
        raise DataError(f"no preference pairs to export ({report.n_dropped} rows dropped); "
                        "give prompt/chosen/rejected rows")
    out, weighted = [], 0
    for example in examples:
        row = {key: example[key] for key in ("prompt", "chosen", "rejected")}
        if "id" in example:
            row["id"] = example["id"]
        weighted += example.get("weight", 1.0) != 1.0
        out.append(row)
    return out, weighted


# ---- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportConfig(Section):
    """Options of `prefalign data export`."""

    COMMAND = "data export"

    input: str = option("", "candidates or label rows (export to argilla, label-studio), or "
                        "any preference data (trl)", positional=True, nargs="?", metavar="IN")
    output: str = option("", "file to write: a JSON list of records or tasks (argilla, "
                         "label-studio), or JSONL (trl)", positional=True, nargs="?",
                         metavar="OUT")
    format: str = option("", "the format to write (required)", choices=FORMATS)

    def validate(self) -> None:
        require(self.format in FORMATS, "format", f"is required: --format "
                f"{'|'.join(FORMATS)}")
        super().validate()


@dataclass(frozen=True)
class ImportConfig(Section):
    """Options of `prefalign data import`."""

    COMMAND = "data import"

    input: str = option("", "Argilla records (dataset.records.to_json) or a Label Studio "
                        "JSON export", positional=True, nargs="?", metavar="IN")
    output: str = option("", "JSONL of label rows to write", positional=True, nargs="?",
                         metavar="OUT")
    format: str = option("", "the format to read (required)", choices=FORMATS[:2])
    prompt_field: str = option("prompt", "the field (Argilla) or data key (Label Studio) that "
                               "holds the prompt")
    question: str | None = option(None, "Argilla: the question holding the preference "
                                  "(default: the only ranking or label question answered)")

    def validate(self) -> None:
        require(self.format in FORMATS[:2], "format", f"is required: --format "
                f"{'|'.join(FORMATS[:2])}")
        super().validate()


def _paths(config: Any) -> None:
    if not config.input or not config.output:
        raise ConfigError(f"give IN and OUT: prefalign {config.COMMAND} --format "
                          f"{config.format} IN OUT")
    if os.path.abspath(config.input) == os.path.abspath(config.output):
        raise ConfigError(f"{config.output} is also the input; write elsewhere")


def _write(path: str, text: str) -> None:
    with atomic_file(path, "w", flag="OUT") as handle:
        handle.write(text)


def run_export(config: ExportConfig) -> int:
    from prefalign.data.sources import load_rows

    _paths(config)
    rows = load_rows(config.input)
    if config.format == "trl":
        out, weighted = trl_rows(rows)
        _write(config.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
        note = (f"; {_plural(weighted, 'row')} had a weight, which TRL's format has no "
                "column for" if weighted else "")
        print(f"{_plural(len(out), 'pair')} -> {config.output} (TRL preference format){note}")
        return 0
    tasks = tasks_from_rows(rows)
    if config.format == "argilla":
        from prefalign.preferences.interchange_argilla import settings_note, to_records
    else:
        from prefalign.preferences.interchange_label_studio import settings_note, to_records
    from prefalign.preferences.labels import tie_votes

    records = to_records(tasks)
    _write(config.output, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    labels = sum(len(t.rankings) for t in tasks)
    ties = len(tie_votes(rows, "annotator"))
    note = (f"; {_plural(ties, 'tie')} left out (the format has no ties: the tied items' "
            "other pairs are written as pairwise tasks)" if ties else "")
    print(f"{_plural(len(tasks), 'item')}, {_plural(labels, 'annotation')} -> "
          f"{config.output}{note}")
    print(settings_note(tasks))
    return 0


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def run_import(config: ImportConfig) -> int:
    from prefalign.data.sources import load_rows

    _paths(config)
    rows = load_rows(config.input)
    if config.format == "argilla":
        from prefalign.preferences.interchange_argilla import from_records

        tasks, skipped = from_records(rows, config.prompt_field, config.question)
    else:
        from prefalign.preferences.interchange_label_studio import from_records

        tasks, skipped = from_records(rows, config.prompt_field)
    out = [row for task in tasks for who, ranks in task.rankings
           for row in label_rows(task, who, ranks)]
    _write(config.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    people = {who for task in tasks for who, _ in task.rankings}
    print(f"{_plural(len(tasks), 'item')}, "
          f"{_plural(sum(len(t.rankings) for t in tasks), 'annotation')} by "
          f"{_plural(len(people), 'annotator')} -> {_plural(len(out), 'pair')} in "
          f"{config.output}"
          + (f"; {skipped} left out (not submitted, cancelled or unanswered)" if skipped
             else ""))
    return 0
