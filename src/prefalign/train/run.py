"""The run skeleton every trainer composes: open, load the data, load the model, fit.

    run = Run.open(config)                                  # output dir, config.yaml, seed
    train, report = run.load("preferences", config.data)    # features + one DataReport
    evals, _ = run.load("preferences", config.eval_data, "eval_data")
    run.load_model()                                        # LoRA applied, or unfrozen
    result = run.fit(algorithm, train, evals)               # the loop, then OUTPUT/final

Decisions made at run time (a fall back from packing, ...) go through run.note: printed and
appended to OUTPUT/run.log, never written back into the config (config.yaml keeps the
settings asked for).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefalign.config import save_config
from prefalign.data.chat import tokens_line
from prefalign.data.report import DataReport
from prefalign.errors import writing
from prefalign.hub import allow_downloads
from prefalign.lora import has_lora, print_trainable_parameters, unload_lora
from prefalign.models import (
    RewardModel,
    check_vocabulary,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    model_reference,
    prepare_for_training,
    save_policy,
)
from prefalign.train.checkpoint import replaced_whole
from prefalign.train.config import TrainConfig
from prefalign.train.distributed import full_model
from prefalign.train.loop import Trainer, TrainResult, make_accelerator
from prefalign.train.output_dir import prepare_output_dir

# The run's log of decisions made at run time (Run.note), next to config.yaml.
RUN_LOG = "run.log"
# What a failed write of the final artifact leaves usable.
FINAL_KEPT = " (checkpoints, if any, are intact: --resume continues from the newest)"


def _loader(kind: str) -> Callable[..., tuple[list[dict], DataReport]]:
    """The loader of one kind of data; each takes (source, tokenizer, limits, options)."""
    if kind == "preferences":  # DPO, reward
        from prefalign.data import load_preferences
        return load_preferences
    if kind == "sft":
        from prefalign.data.instructions import load_instructions
        return load_instructions
    if kind == "unpaired":  # KTO; paired files are split into two rows
        from prefalign.data.unpaired import load_unpaired
        return load_unpaired
    raise ValueError(f"unknown kind of data {kind!r}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device), as transformers.set_seed does, without
    importing transformers' trainer utilities (and peft with them) at every start."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    config: TrainConfig
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    output_dir: Path
    model: torch.nn.Module | None = None  # None until load_model
    loaded: int = 0  # features loaded so far: the next feature's "index"

    @classmethod
    def open(cls, config: TrainConfig, accelerator: Accelerator | None = None) -> Run:
        """Seed, check and create the output dir and config.yaml, load the tokenizer; no model.

        Trainers load their data before the model, so a malformed row stops the run in
        seconds, before the minutes a large model takes to load. The output dir is checked
        first (train.output_dir: no overlap with an input, no earlier run unless resume or
        overwrite, the same settings on resume), before config.yaml replaces the saved one.
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
        return cls(config, accelerator, tokenizer, output_dir)

    @property
    def is_lora(self) -> bool:
        return has_lora(self.model)

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    def note(self, message: str) -> None:
        """Print a decision made at run time (a fall back from packing, ...) and append it to
        OUTPUT/run.log: config.yaml keeps the settings asked for, run.log what was done."""
        self.print(message)
        if self.accelerator.is_main_process:
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            path = self.output_dir / RUN_LOG
            with writing(path), open(path, "a", encoding="utf-8") as log:
                log.write(f"{stamp} {message}\n")

    # -- data ---------------------------------------------------------------------------
    def load(self, kind: str, source: Any, key: str = "data"
             ) -> tuple[list[dict[str, Any]], DataReport | None]:
        """Features of one kind ("preferences", "sft", "unpaired") and their DataReport,
        printed in one line; ([], None) when `source` is empty (no eval data).

        key: the config key that named `source` ("data" or "eval_data"): it picks the split
        and prefixes the report. Each feature carries "index", its position among every
        feature this run loaded (training rows first), so per-row tables (precomputed
        reference log-probs) are looked up without writing into the features.
        """
        if not source:
            return [], None
        c = self.config
        features, report = _loader(kind)(
            source, self.tokenizer, max_length=c.max_length,
            max_prompt_length=c.max_prompt_length, strict=c.strict, columns=c.columns,
            split=c.split if key == "data" else c.eval_split,
            max_drop_fraction=c.max_drop_fraction, log=lambda line: self.print(f"{key}: {line}"))
        for position, feature in enumerate(features, start=self.loaded):
            feature["index"] = position
        self.loaded += len(features)
        self.print(f"{key}: {report.describe()}")
        return features, report

    def load_prompts(self, source: Any) -> tuple[list[dict[str, Any]], DataReport]:
        """Prompts to sample from (PPO), with the same one-line report."""
        from prefalign.data.formats import NormalizeReport
        from prefalign.data.prompts import load_prompts
        from prefalign.data.schemas import source_name

        c = self.config
        prompts = load_prompts(source, c.split, c.columns,
                               log=lambda line: self.print(f"data: {line}"))
        kinds = Counter("text" if isinstance(p["prompt"], str) else "chat" for p in prompts)
        report = DataReport(source_name(source), NormalizeReport(rows=len(prompts), formats=kinds))
        self.print(f"data: {report.describe()}")
        return prompts, report

    # -- models -------------------------------------------------------------------------
    def load_model(self, build: Callable[[PreTrainedTokenizerBase], torch.nn.Module]
                   | None = None) -> torch.nn.Module:
        """Load the trainable model into run.model (LoRA applied, or unfrozen) and check that
        it embeds every token id of the tokenizer. With `config.disable_dropout` every
        dropout of the model, LoRA's included, is switched off (models.disable_dropout).

        build(tokenizer): builds a trainable model other than the default causal LM, e.g. a
        reward model. Data loading draws no random numbers, so fresh heads are initialised
        from the seed Run.open set, as if nothing ran in between.
        """
        config = self.config
        if build is None:
            model = load_causal_lm(config.model, config.trust_remote_code, config.quantization)
            check_vocabulary(self.tokenizer, model, config.model)
            prepare_for_training(model, config)
        else:
            model = build(self.tokenizer)
        # DPO, KTO, reward and PPO configs carry `disable_dropout` (on by default, as in
        # TRL); SFT has no such switch and keeps dropout. References copied from the policy
        # inherit it.
        if getattr(config, "disable_dropout", False):
            disable_dropout(model)
        if self.accelerator.is_main_process:
            print_trainable_parameters(model)
        self.model = model
        return model

    def load_frozen(self, path: str) -> PreTrainedModel:
        """A causal LM that does not train (a reference), checked against the tokenizer."""
        model = load_causal_lm(path, self.config.trust_remote_code)
        check_vocabulary(self.tokenizer, model, path)
        return model.requires_grad_(False).eval()

    # -- training -------------------------------------------------------------------------
    def fit(self, algorithm: Any, train: list[dict], evals: list[dict],
            trainer_cls: type[Trainer] = Trainer, extra: Callable[[Path], None] | None = None,
            model: torch.nn.Module | None = None) -> TrainResult:
        """The loop over `train` (evaluating on `evals`), then OUTPUT/final (see finish).

        model: the module the loop trains; None = run.model scoring completions
        (logprobs.LogpsModel). extra(directory): writes more files into final/.
        """
        if model is None:
            from prefalign.logprobs import LogpsModel

            model = LogpsModel(self.model, chunk_size=self.config.logps_chunk_size)
        trainer = trainer_cls(self.config, model, algorithm, train, evals, self.accelerator)
        result = trainer.train()
        self.finish(extra)
        return result

    def finish(self, extra: Callable[[Path], None] | None = None) -> Path:
        """Write OUTPUT/final (and final-merged on request), whole or absent.

        A causal LM: an adapter (LoRA) or model directory + tokenizer; a LoRA run whose
        --model was an adapter directory writes one combined adapter over the true base
        (lora.save_adapter). A reward model: always one merged sequence-classification
        directory. extra(directory) writes more files into final/ (PPO's value head) before
        it is renamed into place.

        Every process calls it: under FSDP / ZeRO-3 all of them gather the weights, then the
        main process writes the same artifact as a one-process run would.
        """
        self.accelerator.wait_for_everyone()
        final = self.output_dir / "final"
        with full_model(self.model, self.accelerator) as model:
            if self.accelerator.is_main_process:
                merged = None
                if getattr(self.config, "merge", False) and self.is_lora and not isinstance(
                        model, RewardModel):
                    merged = self.output_dir / "final-merged"
                with writing(final, FINAL_KEPT), ExitStack() as stack:
                    final_tmp = stack.enter_context(replaced_whole(final))
                    merged_tmp = stack.enter_context(replaced_whole(merged)) if merged else None
                    self._save(model, final_tmp, merged_tmp)
                    if extra is not None:
                        extra(final_tmp)
                self.print(f"saved {final}" + (f" and {merged}" if merged else ""))
        self.accelerator.wait_for_everyone()
        return final

    def _save(self, model: torch.nn.Module, directory: Path, merged: Path | None) -> None:
        if isinstance(model, RewardModel):
            if has_lora(model.backbone):  # in place: training is over
                unload_lora(model.backbone, merge=True)
            model.save_pretrained(directory, self.tokenizer)
            return
        save_policy(model, self.tokenizer, directory, merged,
                    base_name=model_reference(self.config.model))

