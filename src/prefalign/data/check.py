"""Check a data file before training: what was read, kept, dropped, and how long.

`check_file` runs the same load -> map columns / hub schema -> normalise (-> tokenize) path
as training and returns a summary; DataError from a malformed row propagates for the caller
to print. `kind` picks the loader: preference pairs (dpo, reward), sft (instructions),
unpaired (kto), or auto: from a recognised hub schema, else from the first row's fields
(label + completion: unpaired; messages, text or completion: sft; else preference). With a
tokenizer, the first kept example is also shown as the model sees it: its token ids after
truncation, decoded with special tokens kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefalign.data import formats, instructions, unpaired
from prefalign.data.formats import KEPT_COLUMNS, NormalizeReport, normalize_rows
from prefalign.data.schemas import read_rows, source_name
from prefalign.data.tokenize import (
    CompletionTruncation,
    TruncationReport,
    check_limits,
    render_ids,
    truncate_all,
)
from prefalign.errors import ConfigError

PERCENTILES = (50, 90, 99, 100)
KINDS = ("auto", "preference", "sft", "unpaired")
READ_AS = {"preference": "preference pairs (dpo, reward; kto unpairs them)",
           "sft": "instructions (sft)", "unpaired": "unpaired completions with labels (kto)"}
FORMAT_ORDER = {"preference": formats.FORMATS, "sft": instructions.FORMATS,
                "unpaired": ("text", "conversational")}


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
    kind: str = "preference"  # which loader read the rows (KINDS without auto)
    schema: str | None = None  # the hub schema recognised (data.schemas), if any
    max_drop_fraction: float | None = None
    completion_truncation: tuple[int, int] | None = None  # sft/unpaired: (prompts, completions)
    example: list[tuple[str, str]] = field(default_factory=list)  # (part, decoded text)
    example_origin: str = ""

    @property
    def too_many_dropped(self) -> bool:
        return self.normalize.too_many_dropped(self.max_drop_fraction)

    @property
    def ok(self) -> bool:
        """True when examples survive and no more than max_drop_fraction of rows were dropped."""
        return self.normalize.kept > 0 and not self.too_many_dropped

    def format(self) -> str:
        n = self.normalize
        status = "OK"
        if not n.kept:
            status = "NOT OK: no usable rows"
        elif self.too_many_dropped:
            status = (f"NOT OK: {n.n_dropped} of {n.rows} rows dropped, more than "
                      f"max_drop_fraction {self.max_drop_fraction:g}")
        lines = [
            f"{self.source}: {status}",
            f"rows read: {n.rows}, kept: {n.kept}, dropped: {n.n_dropped}",
        ]
        order = FORMAT_ORDER[self.kind]
        names = [*order, *(k for k in n.formats if k not in order)]
        found = [f"{name} {n.formats[name]}" for name in names if n.formats[name]]
        lines.append(f"formats: {', '.join(found) or 'none'}")
        for reason, count in n.dropped.most_common():
            origins = ", ".join(n.dropped_origins.get(reason, []))
            more = ", ..." if count > len(n.dropped_origins.get(reason, [])) else ""
            lines.append(f"dropped ({reason}): {count} (first: {origins}{more})")
        kept = [f"{k} ({c} rows)" for k, c in self.kept_columns.items()]
        lines.append(f"kept columns: {', '.join(kept) or 'none'}")
        schema = f"{self.schema} rows as " if self.schema else ""
        lines.append(f"read as: {schema}{READ_AS[self.kind]}")
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
        if self.completion_truncation is not None:
            prompts, completions = self.completion_truncation
            lines.append(
                f"truncated (max_length={self.max_length}, max_prompt_length={self.max_prompt_length}): "
                f"prompt {prompts}, completion {completions} of {n.kept} rows"
            )
        if self.example:
            lines.append(f"example ({self.example_origin}) as the model sees it, special tokens "
                         "shown:")
            lines.extend(f"  {part + ':':<12}{text!r}" for part, text in self.example)
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
    split: str | None = None,
    columns: Any = None,
    kind: str = "auto",
    max_drop_fraction: float | None = None,
    log: Callable[[str], None] | None = None,
) -> CheckSummary:
    """Load and normalise `path`; with a tokenizer, also tokenize, measure in tokens and keep
    the first example as the model sees it. The summary is not OK when more than
    max_drop_fraction of the rows were dropped (None: no limit)."""
    check_limits(max_length, max_prompt_length)
    if max_drop_fraction is not None and not 0 <= max_drop_fraction <= 1:
        raise ConfigError(f"--max-drop-fraction must be in [0, 1], got {max_drop_fraction:g}")
    rows, schema, kind = read_rows(path, kind, columns, split, log)
    if kind == "preference":
        examples, report = normalize_rows(rows, strict=strict)
    elif kind == "sft":
        examples, report = instructions.normalize_instructions(rows, strict=strict)
    else:
        examples, report, _ = unpaired.normalize_unpaired(rows, strict=strict)
    summary = CheckSummary(
        source=source_name(path),
        normalize=report,
        kept_columns={k: c for k in KEPT_COLUMNS if (c := sum(k in e for e in examples))},
        kind=kind, schema=schema, max_drop_fraction=max_drop_fraction,
    )
    if not examples:
        return summary
    report.require_weighted(summary.source, examples)
    names = ("prompt", "chosen", "rejected") if kind == "preference" else ("prompt", "completion")
    if tokenizer is None:
        parts = [_char_lengths(e, kind) for e in examples]
    else:
        summary.unit = "tokens"
        summary.max_length, summary.max_prompt_length = max_length, max_prompt_length
        parts = _measure_tokens(summary, examples, tokenizer, names)
    for i, name in enumerate(names):
        column = [p[i] for p in parts]
        summary.lengths[name] = {q: percentile(column, q) for q in PERCENTILES}
    return summary


def _measure_tokens(summary: CheckSummary, examples: list[dict], tokenizer: Any,
                    names: tuple[str, ...]) -> list[tuple[int, ...]]:
    """Untruncated token lengths per example; fills the truncation counts and the example."""
    limits = (summary.max_length, summary.max_prompt_length)
    if summary.kind == "preference":
        rendered, merged = render_ids(examples, tokenizer)
        cut, summary.truncation = truncate_all(rendered, *limits, tokenizer.bos_token_id)
        summary.truncation.boundary_merged = merged
        first = cut[0]
    else:
        tokenize = (instructions.tokenize_instructions if summary.kind == "sft"
                    else unpaired.tokenize_unpaired)
        features, _ = tokenize(examples, tokenizer, None, None)
        rendered = [(f["prompt_input_ids"], f["completion_input_ids"]) for f in features]
        truncation = CompletionTruncation(*limits, tokenizer.bos_token_id)
        first = truncation(*rendered[0])
        for prompt, completion in rendered[1:]:
            truncation(prompt, completion)
        summary.completion_truncation = truncation.counts
    summary.example_origin = examples[0]["origin"]
    summary.example = [(name, _decode(tokenizer, ids)) for name, ids in zip(names, first)]
    if summary.kind == "unpaired":
        label = "desirable" if examples[0]["label"] else "undesirable"
        summary.example.append(("label", label))
    return [tuple(len(x) for x in triple) for triple in rendered]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _char_lengths(example: dict, kind: str) -> tuple[int, ...]:
    if kind == "preference":
        return tuple(_chars(example[k]) for k in ("prompt", "chosen", "rejected"))
    if "text" in example:  # sft language-model rows: no prompt
        return 0, len(example["text"])
    if "messages" in example:
        messages = example["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return _chars(messages[:first]), _chars(messages[first:])
    return _chars(example["prompt"]), _chars(example["completion"])


def _chars(value: str | list[dict]) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)
