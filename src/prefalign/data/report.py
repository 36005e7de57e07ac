"""What loading a data file did, for every kind of data: one report type, one description."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefalign.data.formats import NormalizeReport


@dataclass
class DataReport:
    """Rows read, normalisation counts (kept per format, dropped per reason) and truncation.

    truncated: part -> rows whose part was cut, in the order they are described:
    prompts/chosen/rejected (preferences) or prompts/completions (sft, unpaired).
    kind, desirable/undesirable: unpaired data (`kind` says whether the file held paired
    rows that were split); completion_tokens: instruction data (tokens that get loss).
    """

    source: str
    normalize: NormalizeReport
    truncated: dict[str, int] = field(default_factory=dict)
    kind: str | None = None
    desirable: int | None = None
    undesirable: int | None = None
    completion_tokens: int | None = None

    @property
    def rows(self) -> int:
        return self.normalize.rows

    @property
    def examples(self) -> int:
        """Training examples made: one per kept row, two per paired row split in two."""
        if self.desirable is None:
            return self.normalize.kept
        return self.desirable + (self.undesirable or 0)

    @property
    def truncated_prompts(self) -> int:
        return self.truncated.get("prompts", 0)

    @property
    def truncated_completions(self) -> int:
        return self.truncated.get("completions", 0)

    def describe(self) -> str:
        """'p.jsonl: 12 rows, 11 kept (explicit 11), 1 dropped (chosen equals rejected: 1),
        truncated: 2 prompts, 1 chosen, 0 rejected' (with what the kind adds)."""
        norm = self.normalize
        formats = ", ".join(f"{k} {v}" for k, v in norm.formats.most_common())
        rows = f"{self.kind} rows" if self.kind else "rows"
        text = f"{self.source}: {norm.rows} {rows}, {norm.kept} kept ({formats})"
        if norm.n_dropped:
            reasons = ", ".join(f"{k}: {v}" for k, v in norm.dropped.most_common())
            text += f", {norm.n_dropped} dropped ({reasons})"
        if self.desirable is not None:
            text += (f" -> {self.examples} examples ({self.desirable} desirable, "
                     f"{self.undesirable} undesirable)")
        if self.completion_tokens is not None:
            text += f", {self.completion_tokens} completion tokens"
        if any(self.truncated.values()):
            text += ", truncated: " + ", ".join(f"{n} {part}" for part, n in self.truncated.items())
        return text
