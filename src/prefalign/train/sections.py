"""The config sections the trainers share: model, data, eval, optim, run, reference.

Each is a frozen dataclass of options with its own range checks (validate(), chained
through super(): see config.Section). A trainer's config composes those it uses, so a
trainer that has no eval set (PPO) offers no --eval-data, and one whose output is always
merged (reward) no --merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prefalign.config import Section, option, require
from prefalign.hub import DOWNLOAD_HELP

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "no", "bf16", "fp16")
TRACKERS = ("none", "tensorboard", "wandb")
NONFINITE = ("stop", "skip")


@dataclass(frozen=True)
class ModelOptions(Section):
    """The policy: where it is loaded from, how (quantized, remote code), and its LoRA."""

    SECTION = "model"

    model: str = option("", "model directory (HF model, or a prefalign output dir) or a cached hub id")
    trust_remote_code: bool = option(False, "allow model code from the model directory to run")
    allow_download: bool = option(False, DOWNLOAD_HELP)
    chat_template: str | None = option(
        None, "jinja chat template file that replaces the tokenizer's for this run and is "
        "saved with the tokenizer in final/ (none = the tokenizer's own)")
    text_as_chat: bool = option(
        False, "render text rows (prompt/completion strings, HH transcripts) as user/assistant "
        "turns with the chat template; off = plain text, as TRL")
    lora_r: int = option(16, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = option(32.0, "LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA path")
    lora_targets: list[str] | None = option(
        None, "module names to adapt; none = the architecture's attention projections")
    load_in_4bit: bool = option(
        False, "load the base weights in 4-bit NF4 through bitsandbytes (QLoRA; CUDA only)")
    load_in_8bit: bool = option(
        False, "load the base weights in 8-bit through bitsandbytes (CUDA only)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")

    def validate(self) -> None:
        require(bool(self.model), "model", "is required (--model DIR)")
        require(self.lora_r >= 0, "lora_r", "must be >= 0 (0 = full fine-tuning)")
        require(self.lora_r == 0 or self.lora_alpha > 0, "lora_alpha", "must be > 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        require(not (self.load_in_4bit and self.load_in_8bit), "load_in_4bit",
                "and load_in_8bit exclude each other")
        require(self.quantization is None or self.lora_r > 0, "lora_r",
                "must be > 0 with quantized base weights (they cannot be trained directly)")
        super().validate()

    @property
    def quantization(self) -> str | None:
        """"4bit", "8bit" or None: how models.load_causal_lm loads the base weights."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None


@dataclass(frozen=True)
class PromptDataOptions(Section):
    """Where the rows come from: enough for a trainer that only reads prompts (PPO)."""

    SECTION = "data"

    data: str = option("", "training data: JSONL, JSON, Parquet, CSV or a datasets folder")
    columns: dict[str, str] = option(
        {}, "read fields from other column names, target=source: e.g. "
        "prompt=question,system=system (YAML: the same string or a mapping); applies to "
        "data and eval_data")
    split: str | None = option(
        None, "split of a DatasetDict folder or cached dataset in data; none = train (a "
        "DatasetDict without one is refused naming its splits)")


@dataclass(frozen=True)
class DataOptions(PromptDataOptions):
    """Training rows: the drop limit, truncation, and how examples are batched."""

    max_drop_fraction: float = option(
        0.05, "stop (exit 2) when more than this fraction of the rows of data or eval_data "
        "is dropped (empty completion, chosen == rejected, no shared prompt, ...)")
    strict: bool = option(False, "stop on droppable rows instead of dropping them with a count")
    max_length: int = option(1024, "maximum prompt+completion tokens per sequence")
    max_prompt_length: int = option(512, "maximum prompt tokens (prompts are cut from the left)")
    group_by_length: bool = option(
        False, "shuffle, then put examples of similar length in the same micro-batch "
        "(less padding)")

    def validate(self) -> None:
        require(0 <= self.max_drop_fraction <= 1, "max_drop_fraction", "must be in [0, 1]")
        require(self.max_length >= 2, "max_length", "must be >= 2")
        require(1 <= self.max_prompt_length < self.max_length, "max_prompt_length",
                f"must be in [1, max_length={self.max_length})")
        super().validate()


@dataclass(frozen=True)
class EvalOptions(Section):
    """The evaluation set and how often it is scored."""

    SECTION = "eval"

    eval_data: str | None = option(None, "evaluation data in the same formats")
    eval_split: str | None = option(
        None, "split of a DatasetDict folder or cached dataset in eval_data; none = train")
    eval_steps: int = option(0, "evaluate every N steps (0 = only at the end)")

    def validate(self) -> None:
        require(self.eval_steps >= 0, "eval_steps", "must be >= 0")
        super().validate()


@dataclass(frozen=True)
class OptimOptions(Section):
    """Steps, batches, the optimizer and its schedule, and what a non-finite loss does.

    DEFAULT_LR: the learning rate when none is given, (full fine-tuning, LoRA); a trainer
    that moves further from its start (SFT) sets its own.
    """

    SECTION = "optim"
    DEFAULT_LR: ClassVar[tuple[float, float]] = (5e-6, 5e-5)

    epochs: int = option(1, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = option(None, "optimizer steps to run; overrides epochs")
    batch_size: int = option(4, "examples per device per micro-batch")
    grad_accum: int = option(4, "micro-batches accumulated per optimizer step")
    learning_rate: float | None = option(
        None, "peak learning rate; none = 5e-6 for full fine-tuning, 5e-5 with LoRA",
        aliases=("--lr",))
    lr_scheduler: str = option("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    warmup_ratio: float = option(0.1, "fraction of the steps spent warming up linearly from 0")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables clipping")
    on_nonfinite: str = option(
        "stop", "on a NaN or inf loss or gradient: stop, naming the step and its example ids "
        "(the last checkpoint stays good), or skip that optimizer step (no update; the "
        "schedule and the data move on) and count it as skipped_steps in metrics.jsonl",
        choices=NONFINITE)
    max_skipped_in_a_row: int = option(
        5, "with on_nonfinite skip: the most steps skipped in a row; one more stops the run "
        "(a persistent fault such as a too-high learning rate, not one bad row)")

    def validate(self) -> None:
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        require(self.learning_rate is None or self.learning_rate > 0, "learning_rate",
                "must be > 0")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        require(self.max_skipped_in_a_row >= 1, "max_skipped_in_a_row", "must be >= 1")
        super().validate()

    @property
    def lr(self) -> float:
        """learning_rate, or DEFAULT_LR by whether the model section trains LoRA adapters
        (every trainer composes both sections)."""
        if self.learning_rate is not None:
            return self.learning_rate
        full, lora = self.DEFAULT_LR
        return lora if getattr(self, "lora_r", 0) > 0 else full


@dataclass(frozen=True)
class RunOptions(Section):
    """The output dir, seed, logging, checkpoints, resuming, and how the run computes."""

    SECTION = "run"

    output_dir: str = option("outputs/run", "where checkpoints, metrics and the final model go")
    seed: int = option(42, "seed of initialisation, shuffling and dropout")
    logging_steps: int = option(10, "log metrics every N optimizer steps")
    save_steps: int = option(0, "write a checkpoint every N steps (0 = none until the end)")
    save_total_limit: int = option(2, "checkpoints kept (older ones are deleted)")
    resume: bool = option(
        False, "continue from the newest intact checkpoint in output_dir, with the settings "
        "of its config.yaml (other than logging, saving, memory options and more steps: "
        "see docs/reliability.md, Resuming)")
    resume_from: str | None = option(None, "continue from this checkpoint directory")
    overwrite: bool = option(
        False, "start over in an output_dir that holds an earlier run: remove that run's "
        "files (config.yaml, metrics.jsonl, checkpoints/, final/, ...) first; without it or "
        "resume, a non-empty output_dir is refused")
    report_to: str = option("none", "extra metric tracker", choices=TRACKERS)
    mixed_precision: str = option(
        "auto", "autocast dtype; auto = bf16 on a GPU that supports it, fp32 on CPU",
        choices=PRECISIONS)
    logps_chunk_size: int | None = option(
        None, "score this many tokens at a time through the LM head (bounds logits memory)")

    def validate(self) -> None:
        require(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        require(self.save_steps >= 0, "save_steps", "must be >= 0")
        require(self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        require(not (self.overwrite and (self.resume or self.resume_from)), "overwrite",
                "and resume exclude each other: resume continues the run in output_dir, "
                "overwrite removes it")
        require(self.logps_chunk_size is None or self.logps_chunk_size >= 1, "logps_chunk_size",
                "must be >= 1")
        super().validate()


@dataclass(frozen=True)
class MergeOption(Section):
    """The run section's `merge`, for trainers whose final/ may be an adapter (not reward's,
    which always saves a merged model)."""

    SECTION = "run"

    merge: bool = option(False, "also save the LoRA-merged model in output_dir/final-merged")

    def validate(self) -> None:
        # Composed with ModelOptions in every trainer: merging needs unquantized weights.
        require(getattr(self, "quantization", None) is None or not self.merge, "merge",
                "needs full-precision base weights: train quantized, then merge the saved "
                "adapter into the unquantized base model")
        super().validate()


@dataclass(frozen=True)
class ReferenceOptions(Section):
    """The reference model of trainers that measure the policy against one (DPO, KTO)."""

    SECTION = "reference"

    ref_model: str | None = option(None, "reference model dir; none = the starting model")
