"""`prefalign data agreement`: how far human annotators agree on the same pairs.

    prefalign data agreement alice.jsonl bob.jsonl carol.jsonl --disagreements d.jsonl

The label files are read as votes (preferences/labels.py): one annotator's choice between
the two texts of a pair, the pair identified by its prompt and texts in either order. The
report gives

- for every two annotators, on the pairs both labelled: the share of equal labels and
  Cohen's kappa (agreement.py) with a seeded bootstrap 95% interval that resamples prompts
  (their pairs stay together, since one ranking implies them all), drawn and read as
  evaluation/metrics.py does (bootstrap_indices, percentile_interval); resamples whose kappa
  is undefined are left out;
- Krippendorff's alpha over all annotators (krippendorff.py): nominal on the pairs (the
  values are "first text", "second text", "tie"), and with --level ordinal or interval also
  on the ranks each annotator gave each candidate (units: prompt and candidate; values:
  rank_chosen / rank_rejected, so every row needs them);
- the items (prompts) people disagree on: share of their pairs labelled by two or more
  annotators on which not all agree, highest first; --top of them printed, all written as
  JSONL to --disagreements.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from prefalign.config import Section, option, require
from prefalign.errors import ConfigError, atomic_file
from prefalign.preferences.agreement import cohen_kappa
from prefalign.preferences.krippendorff import krippendorff_alpha
from prefalign.preferences.labels import TIE, LabelSet, Vote, read_label_files
from prefalign.text import printable

DESCRIPTION = ("How far annotators agree on the pairs they labelled: share of equal labels "
               "and Cohen's kappa (with a bootstrap 95% interval) for every two annotators, "
               "Krippendorff's alpha over all, and the items they disagree on.")
RANK_LEVELS = ("ordinal", "interval")


@dataclass(frozen=True)
class AgreementConfig(Section):
    """Options of `prefalign data agreement`."""

    COMMAND = "data agreement"

    labels: list[str] = option([], "label files written by prefalign annotate (one per "
                               "annotator, or rows with an 'annotator' field)",
                               positional=True, nargs="*", metavar="LABELS")
    items: str | None = option(None, "candidates file the labels were made from; a label of "
                               "a prompt or text not in it is an error")
    level: str = option("nominal", "Krippendorff's alpha on the pairs (nominal), and also on "
                        "the ranks each annotator gave each candidate (ordinal or interval)",
                        choices=("nominal", *RANK_LEVELS))
    disagreements: str | None = option(None, "JSONL to write every item annotators disagree "
                                       "on to, most disputed first")
    top: int = option(10, "disputed items to print")
    bootstrap: int = option(1000, "resamples of each kappa's interval; 0: no interval")
    seed: int = option(0, "seed of the bootstrap")
    json: bool = option(False, "print the report as JSON instead of a table")

    def validate(self) -> None:
        require(self.top >= 0, "top", "must be >= 0")
        require(self.bootstrap >= 0, "bootstrap", "must be >= 0")
        super().validate()


def _units(labels: LabelSet) -> dict[tuple, dict[str, Vote]]:
    """pair -> {annotator: vote}, in the order the pairs were first read."""
    units: dict[tuple, dict[str, Vote]] = defaultdict(dict)
    for annotator, votes in labels.votes.items():
        for key, vote in votes.items():
            units[key][annotator] = vote
    return units


def _rank_units(labels: LabelSet, level: str) -> list[list[int]]:
    """(prompt, candidate) -> the rank each annotator gave it, for the rank-level alpha."""
    places: dict[tuple, dict[str, int]] = defaultdict(dict)
    for annotator, votes in labels.votes.items():
        for vote in votes.values():
            if vote.ranks is None:
                raise ConfigError(f"--level {level} compares ranks, but {vote.origin} has no "
                                  "rank_chosen/rank_rejected; use --level nominal")
            for text, rank in zip(vote.texts, vote.ranks):
                places[(vote.item, text)][annotator] = rank
    return [list(by.values()) for by in places.values()]


def pair_table(units: dict[tuple, dict[str, Vote]], annotators: list[str], seed: int,
               rounds: int) -> list[dict]:
    """Agreement and kappa for every two annotators on the pairs both labelled."""
    rows = []
    for a, b in combinations(annotators, 2):
        shared = [(key, votes[a].choice, votes[b].choice) for key, votes in units.items()
                  if a in votes and b in votes]
        row: dict[str, Any] = {"a": a, "b": b, "pairs": len(shared),
                               "items": len({key[0] for key, _, _ in shared}),
                               "agreement": None, "kappa": None, "kappa_interval": None}
        if shared:
            x, y = [s[1] for s in shared], [s[2] for s in shared]
            row["agreement"] = sum(p == q for p, q in zip(x, y)) / len(shared)
            row["kappa"] = cohen_kappa(x, y)
            if rounds:
                groups: dict[str, list] = defaultdict(list)
                for key, p, q in shared:
                    groups[key[0]].append((p, q))
                row["kappa_interval"] = kappa_interval(list(groups.values()), seed, rounds)
        rows.append(row)
    return rows


def kappa_interval(groups: list[list[tuple]], seed: int, rounds: int
                   ) -> tuple[float, float] | None:
    """The bootstrap interval of Cohen's kappa over `groups` (each item's (a, b) label
    pairs); None when no resample has a defined kappa. Each item is counted once into a
    table of label combinations, so a resample is a matrix product, not a pass over pairs."""
    import numpy as np

    from prefalign.evaluation.metrics import bootstrap_indices, percentile_interval

    values = sorted({v for pairs in groups for pair in pairs for v in pair}, key=repr)
    index, size = {v: i for i, v in enumerate(values)}, len(values)
    counts = np.zeros((len(groups), size * size))
    for g, pairs in enumerate(groups):
        for a, b in pairs:
            counts[g, index[a] * size + index[b]] += 1
    kappas = []
    # Chunks of 100 resamples bound the (resamples, items) multiplicity matrix.
    for draw in np.array_split(bootstrap_indices(len(groups), rounds, seed),
                               max(1, rounds // 100)):
        times = np.stack([np.bincount(row, minlength=len(groups)) for row in draw])
        tables = (times @ counts).reshape(-1, size, size)
        n = tables.sum(axis=(1, 2))
        observed = np.trace(tables, axis1=1, axis2=2) / n
        # Integer counts: chance is exactly 1 when both raters used one and the same label.
        chance = (tables.sum(axis=2) * tables.sum(axis=1)).sum(axis=1) / n**2
        defined = chance < 1
        kappas += ((observed[defined] - chance[defined]) / (1 - chance[defined])).tolist()
    return percentile_interval(kappas) if kappas else None


def disputed_items(units: dict[tuple, dict[str, Vote]]) -> list[dict]:
    """Every prompt with a pair its annotators disagree on, most disputed first."""
    items: dict[str, dict] = {}
    for (item, texts), votes in units.items():
        if len(votes) < 2:
            continue
        first = next(iter(votes.values()))
        entry = items.setdefault(item, {"prompt": first.prompt, "id": first.id, "shared": 0,
                                        "disputed": []})
        entry["shared"] += 1
        if len({v.choice for v in votes.values()}) > 1:
            names = {TIE: "tie", 0: "a", 1: "b"}
            entry["disputed"].append({"a": texts[0], "b": texts[1], "votes": {
                name: names[v.choice] for name, v in votes.items()}})
    rows = [{"prompt": e["prompt"], **({"id": e["id"]} if e["id"] is not None else {}),
             "disagreement": len(e["disputed"]) / e["shared"],
             "disputed_pairs": len(e["disputed"]), "shared_pairs": e["shared"],
             "pairs": e["disputed"]} for e in items.values() if e["disputed"]]
    # Stable sort: equally disputed items keep the order they were read in.
    return sorted(rows, key=lambda r: (-r["disagreement"], -r["disputed_pairs"]))


def agreement_report(labels: LabelSet, level: str = "nominal", seed: int = 0,
                     rounds: int = 1000) -> dict:
    """The whole report as a dict (see the module docstring); nan where undefined."""
    units = _units(labels)
    pairable = [[v.choice for v in votes.values()] for votes in units.values()
                if len(votes) >= 2]
    alpha = {"nominal": krippendorff_alpha(pairable, "nominal") if pairable else math.nan}
    if level in RANK_LEVELS:
        alpha[level] = krippendorff_alpha(_rank_units(labels, level), level)
    disputed = disputed_items(units)
    return {
        "annotators": [{"name": name, "files": labels.files[name], "pairs": len(votes),
                        "items": len({key[0] for key in votes})}
                       for name, votes in labels.votes.items()],
        "pairs": len(units), "shared_pairs": len(pairable),
        "left_out": {"conflicting": labels.conflicting, "identical": labels.identical},
        "alpha": alpha,
        "pairwise": pair_table(units, labels.annotators, seed, rounds),
        "bootstrap": {"rounds": rounds, "seed": seed},
        "items_shared": len({key[0] for key, votes in units.items() if len(votes) >= 2}),
        "disagreements": disputed,
    }


def _num(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _short(text: Any, width: int = 60) -> str:
    text = text if isinstance(text, str) else " / ".join(
        str(m.get("content", "")) for m in text if isinstance(m, dict))
    text = printable(" ".join(text.split()), keep="")
    return text if len(text) <= width else text[: width - 3] + "..."


def format_report(r: dict, top: int = 10, written: str | None = None) -> str:
    lines = [f"{len(r['annotators'])} annotators: " + ", ".join(
        f"{a['name']} ({a['pairs']} pairs, {a['items']} items)" for a in r["annotators"]),
        f"{r['shared_pairs']} of {r['pairs']} pairs labelled by two or more annotators, over "
        f"{r['items_shared']} items"]
    left = r["left_out"]
    if left["conflicting"] or left["identical"]:
        lines.append(f"left out: {left['conflicting']} pairs one annotator labelled both "
                     f"ways, {left['identical']} rows comparing identical texts")
    lines.append("Krippendorff's alpha: " + ", ".join(
        f"{_num(v)} ({level}{', pairs' if level == 'nominal' else ', ranks'})"
        for level, v in r["alpha"].items()))
    width = max([len("annotators")] + [len(p["a"]) + len(p["b"]) + 3 for p in r["pairwise"]])
    rounds = r["bootstrap"]["rounds"]
    lines.append(f"{'annotators':<{width}}  {'pairs':>6}  {'agree':>6}  {'kappa':>6}  "
                 + (f"95% interval ({rounds} resamples of items)" if rounds else
                    "(no interval: --bootstrap 0)"))
    for p in r["pairwise"]:
        interval = p["kappa_interval"]
        shown = (f"{_num(interval[0])} to {_num(interval[1])}" if interval else
                 "n/a" if rounds else "")
        lines.append(f"{p['a'] + ' & ' + p['b']:<{width}}  {p['pairs']:>6}  "
                     f"{_num(p['agreement']):>6}  {_num(p['kappa']):>6}  {shown}".rstrip())
    disputed = r["disagreements"]
    where = f" (all written to {written})" if written else ""
    lines.append(f"items with disagreement: {len(disputed)} of {r['items_shared']}{where}")
    for d in disputed[:top]:
        lines.append(f"  {d['disputed_pairs']}/{d['shared_pairs']} pairs  "
                     f"{_short(d['prompt'])}")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """nan -> None (JSON has no NaN), tuples -> lists."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_agreement(config: AgreementConfig) -> dict:
    """Read, compute, write --disagreements and print the report; returns the report."""
    paths = config.labels
    if not paths:
        raise ConfigError("give one or more label files (several annotators: one file each, "
                          "or rows with an 'annotator' field)")
    if config.disagreements and os.path.abspath(config.disagreements) in {
            os.path.abspath(p) for p in [*paths, config.items or ""]}:
        raise ConfigError(f"--disagreements {config.disagreements} is also an input; write "
                          "it elsewhere")
    labels = read_label_files(paths, config.items)
    report = agreement_report(labels, config.level, config.seed, config.bootstrap)
    if config.disagreements:
        with atomic_file(config.disagreements, "w", flag="--disagreements") as handle:
            for row in report["disagreements"]:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    if config.json:
        print(json.dumps(_jsonable(report), ensure_ascii=False, indent=1))
    else:
        print(printable(format_report(report, config.top, config.disagreements), keep="\n"))
    return report
