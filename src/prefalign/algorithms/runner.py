"""What every trainer does around the loop: set up, load, report, save."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefalign.config import save_config
from prefalign.data.chat import tokens_line
from prefalign.errors import writing
from prefalign.hub import allow_downloads
from prefalign.lora import has_lora, print_trainable_parameters
from prefalign.models import (
    check_vocabulary,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    prepare_for_training,
    save_policy,
)
from prefalign.train.checkpoint import replaced_whole
from prefalign.train.config import TrainConfig
from prefalign.train.distributed import full_model
from prefalign.train.loop import make_accelerator
from prefalign.train.output_dir import prepare_output_dir

# What a failed write of the final artifact leaves usable.
FINAL_KEPT = " (checkpoints, if any, are intact: --resume continues from the newest)"


@dataclass
class Run:
    config: TrainConfig
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel | None  # None between open_run and load_policy
    output_dir: Path

    @property
    def is_lora(self) -> bool:
        return has_lora(self.model)

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)


def model_reference(path: str) -> str:
    """How an artifact names its base: an absolute path for local dirs, else the hub id."""
    local = Path(path)
    return str(local.resolve()) if local.exists() else path


def start_run(config: TrainConfig, accelerator: Accelerator | None = None,
              load_model: Callable[[PreTrainedTokenizerBase], torch.nn.Module] | None = None
              ) -> Run:
    """open_run, then load_policy: everything a trainer needs before its data."""
    return load_policy(open_run(config, accelerator), load_model)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device), as transformers.set_seed does, without
    importing transformers' trainer utilities (and peft with them) at every start."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_run(config: TrainConfig, accelerator: Accelerator | None = None) -> Run:
    """Seed, check and create the output dir and config.yaml, load the tokenizer; no model.

    Trainers load their data between open_run and load_policy, so a malformed row stops
    the run in seconds, before the minutes a large model takes to load. The output dir is
    checked first (train.output_dir: no overlap with an input, no earlier run unless
    resume or overwrite, the same settings on resume), before config.yaml replaces the
    saved one.
    """
    accelerator = accelerator or make_accelerator(config.mixed_precision)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        with writing(output_dir):  # --overwrite's removals in a read-only folder
            prepare_output_dir(config, accelerator.print)
        with writing(output_dir / "config.yaml"):  # a read-only folder fails here, at once
            output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, output_dir / "config.yaml")
    accelerator.wait_for_everyone()  # no process reads output_dir before the checks pass
    if config.allow_download:  # library callers too, not only the command line
        allow_downloads()
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code, config.chat_template,
                               config.text_as_chat)
    accelerator.print(tokens_line(tokenizer))
    return Run(config, accelerator, tokenizer, None, output_dir)


def load_policy(run: Run, load_model: Callable[[PreTrainedTokenizerBase], torch.nn.Module]
                | None = None) -> Run:
    """Load the trainable model into `run` (LoRA applied, or unfrozen) and check that it
    embeds every token id of the tokenizer. With `config.disable_dropout` every dropout of
    the model, LoRA's included, is switched off (models.disable_dropout).

    load_model(tokenizer): builds a trainable model other than the default causal LM with
    LoRA (or unfrozen), e.g. a reward model. Data loading draws no random numbers, so fresh
    heads are initialised from the seed open_run set, as if nothing ran in between.
    """
    config = run.config
    if load_model is None:
        model = load_causal_lm(config.model, config.trust_remote_code, config.quantization)
        check_vocabulary(run.tokenizer, model, config.model)
        prepare_for_training(model, config)
    else:
        model = load_model(run.tokenizer)
    # DPO, KTO, reward and PPO configs carry `disable_dropout` (on by default, as in TRL);
    # SFT has no such switch and keeps dropout. References copied from the policy inherit it.
    if getattr(config, "disable_dropout", False):
        disable_dropout(model)
    if run.accelerator.is_main_process:
        print_trainable_parameters(model)
    run.model = model
    return run


def load_frozen(path: str, run: Run) -> PreTrainedModel:
    model = load_causal_lm(path, run.config.trust_remote_code)
    check_vocabulary(run.tokenizer, model, path)
    return model.requires_grad_(False).eval()


def finish_run(run: Run, extra: Callable[[Path], None] | None = None) -> Path:
    """Write OUTPUT/final (adapter or full model + tokenizer), and final-merged on request.

    extra(directory): writes more files into final/ (PPO's value head), before it is
    renamed into place, so final/ is whole or absent with them too.

    A LoRA run whose --model was an adapter directory writes one combined adapter over the
    true base (lora.save_adapter), not an adapter naming that directory as its base.

    Every process calls it: under FSDP / ZeRO-3 all of them gather the weights, then the
    main process writes the same artifact as a one-process run would.
    """
    run.accelerator.wait_for_everyone()
    final = run.output_dir / "final"
    with full_model(run.model, run.accelerator) as model:
        if run.accelerator.is_main_process:
            merged = run.output_dir / "final-merged" if run.config.merge and run.is_lora else None
            with writing(final, FINAL_KEPT), ExitStack() as stack:
                final_tmp = stack.enter_context(replaced_whole(final))
                merged_tmp = stack.enter_context(replaced_whole(merged)) if merged else None
                save_policy(model, run.tokenizer, final_tmp, merged_tmp,
                            base_name=model_reference(run.config.model))
                if extra is not None:
                    extra(final_tmp)
            run.print(f"saved {final}" + (f" and {merged}" if merged else ""))
    run.accelerator.wait_for_everyone()
    return final


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_pairs(source: str, run: Run, key: str) -> list[dict[str, Any]]:
    """Preference features for training or evaluation, with a one-line data report."""
    from prefalign.data import load_preferences

    c = run.config
    features, report = load_preferences(source, run.tokenizer, max_length=c.max_length,
                                        max_prompt_length=c.max_prompt_length, strict=c.strict,
                                        **data_options(run, key))
    run.print(f"{key}: {describe_report(report)}")
    return features


def data_options(run: Run, key: str) -> dict[str, Any]:
    """The loader options every trainer passes for `data` or `eval_data` (data.schemas):
    column mapping, split, the drop limit, and the "recognised <schema>" line."""
    c = run.config
    return {"columns": c.columns, "split": c.split if key == "data" else c.eval_split,
            "max_drop_fraction": c.max_drop_fraction,
            "log": lambda line: run.print(f"{key}: {line}")}


def describe_report(report) -> str:
    """'120 rows, 118 kept (explicit 118), 2 dropped (chosen == rejected: 2), truncated: ...'"""
    norm, trunc = report.normalize, report.truncation
    formats = ", ".join(f"{k} {v}" for k, v in norm.formats.most_common())
    text = f"{report.source}: {norm.rows} rows, {norm.kept} kept ({formats})"
    if norm.n_dropped:
        reasons = ", ".join(f"{k}: {v}" for k, v in norm.dropped.most_common())
        text += f", {norm.n_dropped} dropped ({reasons})"
    if trunc.any:
        text += (f", truncated: {trunc.prompt} prompts, {trunc.chosen} chosen, "
                 f"{trunc.rejected} rejected")
    return text
