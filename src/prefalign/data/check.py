"""Check a preference data file before training: what was read, kept, dropped, and how long.

`check_file` runs the same load -> normalise (-> tokenize) path as training and returns a
summary; DataError from a malformed row propagates for the caller to print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefalign.data.formats import FORMATS, KEPT_COLUMNS, NormalizeReport, normalize_rows
from prefalign.data.sources import load_rows
from prefalign.data.tokenize import TruncationReport, check_limits, render_ids, truncate_all

PERCENTILES = (50, 90, 99, 100)


@dataclass
class CheckSummary:
    """The result of check_file; `format()` gives the text the CLI prints."""

    source: str
    normalize: NormalizeReport
    kept_columns: dict[str, int] = field(default_factory=dict)
    unit: str = "characters"  # or "tokens" when a tokenizer was given
    lengths: dict[str, dict[int, int]] = field(default_factory=dict)  # part -> percentile -> length
    truncation: TruncationReport | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None

    @property
    def ok(self) -> bool:
        """True when at least one example survives: there is something to train on."""
        return self.normalize.kept > 0

    def format(self) -> str:
        n = self.normalize
        status = "OK" if self.ok else "NOT OK: no usable rows"
        lines = [
            f"{self.source}: {status}",
            f"rows read: {n.rows}, kept: {n.kept}, dropped: {n.n_dropped}",
        ]
        found = [f"{name} {n.formats[name]}" for name in FORMATS if n.formats[name]]
        lines.append(f"formats: {', '.join(found) or 'none'}")
        for reason, count in n.dropped.most_common():
            origins = ", ".join(n.dropped_origins.get(reason, []))
            more = ", ..." if count > len(n.dropped_origins.get(reason, [])) else ""
            lines.append(f"dropped ({reason}): {count} (first: {origins}{more})")
        kept = [f"{k} ({c} rows)" for k, c in self.kept_columns.items()]
        lines.append(f"kept columns: {', '.join(kept) or 'none'}")
        if self.lengths:
            header = f"lengths in {self.unit}"
            lines.append(f"{header:<22}" + "".join(f"{_label(q):>8}" for q in PERCENTILES))
            for part, values in self.lengths.items():
                lines.append(f"  {part:<20}" + "".join(f"{values[q]:>8}" for q in PERCENTILES))
        if self.truncation is not None:
            t = self.truncation
            lines.append(
                f"truncated (max_length={self.max_length}, max_prompt_length={self.max_prompt_length}): "
                f"prompt {t.prompt}, chosen {t.chosen}, rejected {t.rejected} of {t.rows} rows"
            )
            if t.boundary_merged:
                lines.append(
                    f"prompt/completion boundary merged into one token: {t.boundary_merged} rows"
                )
        return "\n".join(lines)


def _label(q: int) -> str:
    return "max" if q == 100 else f"p{q}"


def percentile(values: list[int], q: int) -> int:
    """Nearest-rank percentile (an actual observed length; q=100 is the maximum)."""
    ordered = sorted(values)
    rank = max(1, -(-q * len(ordered) // 100))
    return ordered[rank - 1]


def check_file(
    path: Any,
    tokenizer: Any = None,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    strict: bool = False,
    split: str = "train",
) -> CheckSummary:
    """Load and normalise `path`; with a tokenizer, also tokenize and measure in tokens."""
    check_limits(max_length, max_prompt_length)
    examples, report = normalize_rows(load_rows(path, split=split), strict=strict)
    summary = CheckSummary(
        source=str(path) if not isinstance(path, (list, tuple)) else "<list>",
        normalize=report,
        kept_columns={k: c for k in KEPT_COLUMNS if (c := sum(k in e for e in examples))},
    )
    if not examples:
        return summary
    if tokenizer is None:
        parts = [tuple(_chars(e[k]) for k in ("prompt", "chosen", "rejected")) for e in examples]
    else:
        rendered, merged = render_ids(examples, tokenizer)
        parts = [tuple(len(x) for x in triple) for triple in rendered]
        summary.unit = "tokens"
        _, summary.truncation = truncate_all(
            rendered, max_length, max_prompt_length, tokenizer.bos_token_id
        )
        summary.truncation.boundary_merged = merged
        summary.max_length, summary.max_prompt_length = max_length, max_prompt_length
    for i, name in enumerate(("prompt", "chosen", "rejected")):
        column = [p[i] for p in parts]
        summary.lengths[name] = {q: percentile(column, q) for q in PERCENTILES}
    return summary


def _chars(value: str | list[dict]) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)
