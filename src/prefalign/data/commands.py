"""`prefalign data check` and `prefalign data merge`: their configs and runs."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.config import option, require
from prefalign.data.chat import ChatOptions
from prefalign.errors import ConfigError, DataError
from prefalign.preferences.merge_agreement import AgreementOptions

CHECK_DESCRIPTION = (
    "Read a data file (JSONL, JSON, Parquet, CSV or a datasets folder), map its columns or "
    "recognise its hub schema, normalise every row as the trainer will and print rows, "
    "formats, dropped rows with reasons and length percentiles, and with --model one "
    "example as the model sees it (a chat template or --text-as-chat needs --model). Exits "
    "0 when rows are usable, 1 when every row was dropped, 2 on a malformed file or row "
    "(naming file, line or row, and field), when more than --max-drop-fraction of the rows "
    "were dropped and, under --strict, on a droppable row.")

MERGE_DESCRIPTION = (
    "Read preference files in any format prefalign loads, weight each file, remove exact "
    "duplicate pairs (keeping the heaviest copy) and write normalised JSONL rows with source "
    "and weight, plus a validation split drawn in the same proportion from every source.")


@dataclass(frozen=True)
class DataCheckConfig(ChatOptions):
    SECTION = ""
    COMMAND = "data check"

    file: str = option("", "data file or datasets folder", positional=True, metavar="FILE")
    model: str | None = option(None, "model or tokenizer directory: lengths in tokens and one "
                               "example rendered as the model sees it (none = lengths in "
                               "characters)")
    kind: str = option("auto", "read the rows as the trainer of this kind does: preference "
                       "(dpo, reward), sft or kto; auto: from a recognised hub schema, else "
                       "from the first row's fields", choices=("auto", "preference", "sft", "kto"))
    columns: str | None = option(None, "read fields from other column names, e.g. "
                                 "prompt=question,system=system", metavar="TARGET=SOURCE,...")
    split: str | None = option(None, "split of a DatasetDict folder or cached dataset (none = "
                               "train; a DatasetDict without one is refused)")
    max_drop_fraction: float = option(0.05, "exit 2 when more than this fraction of the rows "
                                      "is dropped")
    max_length: int = option(1024, "maximum prompt+completion tokens")
    max_prompt_length: int = option(512, "maximum prompt tokens")
    strict: bool = option(False, "treat droppable rows (empty completion, chosen == rejected) "
                          "as errors")

    def validate(self) -> None:
        require(bool(self.file), "file", "is required (data check FILE)")
        if not self.model and (self.chat_template or self.text_as_chat):
            flag = "--chat-template" if self.chat_template else "--text-as-chat"
            raise ConfigError(f"{flag} needs --model: without a tokenizer nothing is tokenized")
        super().validate()


def run_check(config: DataCheckConfig) -> int:
    """Print the summary; 0 when rows are usable, 1 when every row was dropped."""
    from prefalign.data.chat import tokens_line
    from prefalign.data.check import check_file
    from prefalign.models import load_tokenizer

    tokenizer = None
    if config.model:
        tokenizer = load_tokenizer(config.model, chat_template=config.chat_template,
                                   text_as_chat=config.text_as_chat)
    # How the rows were read and tokenized goes under the counts, before the lengths.
    notes = [tokens_line(tokenizer)] if tokenizer is not None else []
    summary = check_file(config.file, tokenizer=tokenizer, max_length=config.max_length,
                         max_prompt_length=config.max_prompt_length, strict=config.strict,
                         split=config.split, columns=config.columns,
                         kind="unpaired" if config.kind == "kto" else config.kind,
                         max_drop_fraction=config.max_drop_fraction,
                         log=lambda line: notes.append(f"data: {line}"))
    lines = summary.format().splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("lengths in")), len(lines))
    print("\n".join(lines[:at] + notes + lines[at:]), flush=True)
    if summary.normalize.kept and summary.too_many_dropped:
        raise DataError(summary.normalize.drop_error(summary.source, config.max_drop_fraction))
    return 0 if summary.ok else 1


@dataclass(frozen=True)
class DataMergeConfig(AgreementOptions):
    SECTION = ""
    COMMAND = "data merge"

    inputs: list[str] = option([], "preference files; a number after the last colon is the "
                               "file's weight (default 1), e.g. b.jsonl:5; a path that itself "
                               "ends in ':NUMBER' needs an explicit weight, e.g. data:2:1",
                               positional=True, nargs="+", metavar="FILE[:WEIGHT]")
    output: str = option("", "merged training file (.jsonl)", aliases=("-o",))
    mode: str = option("column", "column: multiply each row's weight column by the file's "
                       "weight; repeat: write each row WEIGHT times (whole numbers only)",
                       choices=("column", "repeat"))
    val_fraction: float = option(0.0, "fraction of every source held out for validation")
    val_output: str | None = option(None, "validation file (none = OUTPUT with .val before "
                                    "the suffix)")
    stratify_by: str = option("source", "column whose values are split in equal proportion; "
                              "'' for none")
    dedupe: bool = option(True, "remove exact duplicate (prompt, chosen, rejected) rows "
                          "(--no-dedupe keeps them)")
    seed: int = option(0, "split seed")

    def validate(self) -> None:
        require(bool(self.inputs), "inputs", "is required (data merge FILE[:WEIGHT] ...)")
        require(bool(self.output), "output", "is required (--output FILE)")
        super().validate()


def run_merge(config: DataMergeConfig) -> int:
    from prefalign.preferences.merge import merge_preferences, parse_input_spec

    report = merge_preferences(
        [parse_input_spec(text) for text in config.inputs], config.output, mode=config.mode,
        dedupe=config.dedupe, val_fraction=config.val_fraction, seed=config.seed,
        stratify_by=config.stratify_by or None, val_output=config.val_output,
        agreement=config.agreement, min_annotators=config.min_annotators)
    print(report.format())
    return 0
