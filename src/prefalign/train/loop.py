"""The one training loop. It knows nothing of algorithms.

An algorithm supplies `collate(features) -> batch` (a typed batch of prefalign.batches,
or another dataclass with `.to(device)` and a `stand_in` field), `units(features) -> float` (the
count its loss is a mean over: pairs, rows or tokens) and `compute_loss(model, batch) ->
(loss, metrics)`. The loop does the rest: shuffling, accumulation, clipping, schedule,
evaluation, checkpoints, exact resume, metrics and the progress bar, on CPU, one GPU or
under `accelerate launch`. A NaN or inf loss or gradient stops the run naming the step and
its example ids, or with on_nonfinite "skip" drops that optimizer step and counts it.

Accumulation is exact: each micro-batch's mean loss is weighted by its share of the units
of the whole optimizer step (across processes), so 1 x 8 accumulated equals 8 x 1 even
when micro-batches differ in size or the loss is a mean over tokens.

`Trainer.step` is one optimizer update over given micro-batches; `train` runs the
offline loop (windows of the shuffled data, one step each) around it.

Data parallelism (DDP, FSDP, DeepSpeed) comes from accelerate. Every process cuts the same
windows (train.window); one whose share of a micro-batch is empty runs a stand-in
(train.window.Share), its batch's `stand_in` set for algorithms that exchange values
across processes (KTO). Metrics are reduced across processes when logged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from prefalign.errors import ConfigError, PrefalignError
from prefalign.train import distributed
from prefalign.train.batching import feature_length, length_grouped_order
from prefalign.train.checkpoint import (
    load_checkpoint,
    load_sharded_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from prefalign.train.config import TrainConfig
from prefalign.train.diagnostics import detached_loss_problem, lora_gradient_problem
from prefalign.train.metrics import MetricLogger, MetricWindow
from prefalign.train.nonfinite import NonFiniteGuard, all_finite
from prefalign.train.resume import checkpoint_to_resume
from prefalign.train.schedule import warmup_schedule
from prefalign.train.window import Features, Share, epoch_order, process_shares


class Algorithm(Protocol):
    progress_keys: tuple[str, ...]

    def collate(self, features: Features) -> Any: ...

    def units(self, features: Features) -> float: ...

    def compute_loss(self, model: torch.nn.Module, batch: Any
                     ) -> tuple[torch.Tensor, dict[str, Any]]: ...


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    """The Accelerator of a run; the engine is whatever `accelerate launch` / torchrun set up.

    "auto": the launcher's mixed precision when `accelerate launch` set one, else bf16 on a
    GPU that supports it and fp32 otherwise.
    """
    if mixed_precision == "auto":
        fast_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
            "bf16" if fast_bf16 else "no")
    return Accelerator(mixed_precision=mixed_precision, cpu=distributed.cpu_only_launch())


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float
                   ) -> torch.optim.AdamW:
    """AdamW, fused where every parameter allows it: one kernel updates all of them (several
    times faster than the per-parameter loop on a CPU; Hugging Face Trainer's default)."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0  # optimizer steps dropped under on_nonfinite "skip"


class Trainer:
    """Runs `algorithm` on `model` over `train_features` as `config` says."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, algorithm: Algorithm,
                 train_features: Features, eval_features: Features | None = None,
                 accelerator: Accelerator | None = None) -> None:
        if not train_features:
            raise PrefalignError("no training examples left after loading the data")
        self.config = config
        self.algorithm = algorithm
        self.train_features = train_features
        self.eval_features = eval_features or []
        self.accelerator = accelerator or make_accelerator(config.mixed_precision)
        if (config.on_nonfinite == "skip"
                and self.accelerator.distributed_type == DistributedType.DEEPSPEED):
            raise ConfigError("config key 'on_nonfinite' skip is not possible under DeepSpeed, "
                              "which updates the weights inside backward; use stop")
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.unwrapped = model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise PrefalignError("the model has no trainable parameters")
        optimizer = make_optimizer(params, config.lr, config.weight_decay)
        self.total_steps = self._total_steps()
        warmup = math.ceil(config.warmup_ratio * self.total_steps)
        self.scheduler = warmup_schedule(optimizer, config.lr_scheduler, warmup, self.total_steps)
        acc = self.accelerator
        distributed.configure_engine(acc, model, config.batch_size, config.max_grad_norm)
        shell = distributed.meta_copy(model) if distributed.shards_parameters(acc) else None
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if shell is not None:
            distributed.register_sharded(model, self.model, shell)
        # After prepare: FSDP clips only through the parameters of the module it wrapped.
        self.clip_params = list(self.model.parameters())
        self.gather = distributed.gather_fn(acc)
        self.window = MetricWindow()
        self.global_step = 0  # training steps done (a step is one window)
        self.consumed = 0  # examples consumed, all epochs, all processes
        self.nonfinite = NonFiniteGuard(config.on_nonfinite, config.max_skipped_in_a_row,
                                        self.checkpoint_dir, self.accelerator.is_main_process)
        self._lengths: list[int] | None = None  # per example, for group_by_length
        self.gradients_checked = False  # train.diagnostics, once after the first backward

    @property
    def skipped(self) -> int:
        """Optimizer steps dropped so far for a non-finite loss or gradient."""
        return self.nonfinite.skipped

    # -- data -------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * self.accelerator.num_processes

    def _total_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        per_epoch = math.ceil(len(self.train_features) / self.global_batch)
        return per_epoch * self.config.epochs

    def _epoch_order(self, epoch: int) -> list[int]:
        n, seed = len(self.train_features), self.config.seed
        if not self.config.group_by_length:
            return epoch_order(n, seed, epoch)
        if self._lengths is None:
            self._lengths = [feature_length(f) for f in self.train_features]
        # One group = one micro-batch across processes, so each process's share of it
        # holds examples of similar length.
        group = self.config.batch_size * self.accelerator.num_processes
        return length_grouped_order(self._lengths, seed, epoch, group)

    def _next_order(self) -> list[int]:
        """The positions in train_features of the next step's window (all processes).

        Windows never cross an epoch boundary: the last one of an epoch may be smaller.
        """
        n = len(self.train_features)
        epoch, offset = divmod(self.consumed, n)
        order = self._epoch_order(epoch)[offset : offset + self.global_batch]
        self.consumed += len(order)
        return order

    def _next_window(self) -> tuple[list[Share], float, list[Any]]:
        """This process's micro-batches for the next step, the step's total units, its ids."""
        order = self._next_order()
        window = [self.train_features[i] for i in order]
        shares, total = process_shares(window, self.config.batch_size,
                                       self.accelerator.num_processes,
                                       self.accelerator.process_index, self.algorithm.units)
        return shares, total, order

    # -- one step ---------------------------------------------------------------------
    def _train_step(self) -> None:
        """One training step: one optimizer update over the next window. (The on-policy
        loop, algorithms.onpolicy, makes a step a rollout and several updates instead.)"""
        shares, total_units, ids = self._next_window()
        self.model.train()
        self.step(shares, total_units, ids)
        self.scheduler.step()
        self.global_step += 1

    def _batch(self, features: Features, stand_in: bool) -> Any:
        batch = self.algorithm.collate(features).to(self.accelerator.device)
        return dataclasses.replace(batch, stand_in=True) if stand_in else batch

    def step(self, shares: list[Share], total_units: float, ids: list[int]) -> bool:
        """One optimizer update: accumulate gradients over `shares` (this process's
        micro-batches), each weighted by its units' share of `total_units` (the units of
        the update over every process), clip, and step the optimizer.

        ids: the update's example positions in train_features, named if it is not finite.
        Returns False when the update was dropped (a non-finite loss or gradient under
        on_nonfinite "skip"). Neither the schedule nor the step count moves: the caller
        decides what one training step is (the offline loop: one window, one update).
        """
        acc = self.accelerator
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        loss_sum = torch.zeros((), device=acc.device)
        kept: list[tuple[dict[str, Any], float]] = []  # metrics, logged if the update is kept
        for k, share in enumerate(shares):
            batch = self._batch(share.features, share.stand_in)
            sync = k == len(shares) - 1
            if deepspeed:
                # DeepSpeed reduces and steps inside backward, where told the window ends.
                acc.gradient_state._set_sync_gradients(sync)
            with nullcontext() if sync else acc.no_sync(self.model), acc.autocast():
                loss, metrics = self.algorithm.compute_loss(self.model, batch)
                if not loss.requires_grad:  # backward would fail with an opaque RuntimeError
                    raise PrefalignError(detached_loss_problem(self.unwrapped))
                # DDP averages gradients over processes: scale the share back up by P.
                # A stand-in (0 units) still runs backward, contributing zero gradients.
                share_of_step = share.units / total_units if total_units else 0.0
                acc.backward(loss * share_of_step * acc.num_processes)
            if share.units:
                loss_sum = loss_sum + loss.detach() * share.units
                kept.append(({"loss": loss.detach(), **metrics}, share.units))
        # Without clipping the norm is still needed: a gradient can be NaN behind a finite
        # loss (e.g. 0 * inf in backward). Clipping to inf multiplies by exactly 1.
        grad_norm = acc.clip_grad_norm_(self.clip_params, self.config.max_grad_norm or math.inf)
        # Under fp16 the grad scaler skips steps whose gradients overflowed (and lowers its
        # scale): that is how it works, not a fault, so there only the loss is checked.
        checked_norm = grad_norm if acc.scaler is None else None
        if not all_finite(acc, loss_sum, checked_norm):
            shown = [self.train_features[i].get("id", i) for i in ids[:16]]
            self.nonfinite.handle(self.global_step + 1, shown, more=len(ids) > 16)
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.nonfinite.passed()
        for step_metrics, weight in kept:
            self.window.add(step_metrics, weight=weight)
        if grad_norm is not None:
            self.window.add({"grad_norm": torch.as_tensor(grad_norm)}, weight=1.0)
        if not self.gradients_checked:  # sharded engines hold no whole gradient to read
            self.gradients_checked = True
            problem = None if distributed.sharded_states(acc) else lora_gradient_problem(
                self.unwrapped, [p for g in self.optimizer.param_groups for p in g["params"]])
            if problem and acc.is_main_process:
                tqdm.write(f"warning: {problem}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Means over the whole eval set; each process scores every P-th example.

        Shards differ by one example at most, but every process runs the same number of
        batches (FSDP and ZeRO-3 gather weights in each forward): one that runs out scores
        a stand-in that is not counted. The weighted sums are then added across processes.
        """
        acc = self.accelerator
        window = MetricWindow()
        self.model.eval()
        size = self.config.batch_size
        shard = self.eval_features[acc.process_index :: acc.num_processes]
        largest = math.ceil(len(self.eval_features) / acc.num_processes)
        for start in range(0, largest, size):
            features = shard[start : start + size]
            batch = self._batch(features or self.eval_features[:1], stand_in=not features)
            with acc.autocast():
                loss, metrics = self.algorithm.compute_loss(self.model, batch)
            if features:
                window.add({"loss": loss, **metrics}, weight=self.algorithm.units(features))
        window.reduce(self.gather)
        return {f"eval/{k}": v for k, v in window.means().items()}

    # -- checkpoints ------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        # The window's totals over every process; on resume only the main process takes
        # them back, so the next log adds them up once.
        state = {"consumed": self.consumed, "window": self.window.state(self.gather),
                 "total_steps": self.total_steps, "num_processes": self.accelerator.num_processes,
                 "engine": distributed.engine_name(self.accelerator), **self.nonfinite.state()}
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        """Take back what _trainer_state saved (and the step count)."""
        self.global_step, self.consumed = state["step"], state["consumed"]
        self.nonfinite.load_state(state)
        self.window.reset()
        if self.accelerator.is_main_process:
            self.window.load_state(state.get("window", {}))

    def save(self) -> Path | None:
        """Write checkpoints/step-N (see train.checkpoint for the format of each engine)."""
        acc, c = self.accelerator, self.config
        acc.wait_for_everyone()
        state = self._trainer_state()
        if distributed.sharded_states(acc):
            return save_sharded_checkpoint(self.checkpoint_dir, self.global_step, acc, self.scheduler,
                                           state, c.save_total_limit)
        rngs = self.gather(rng_state()) if self.gather else None
        path = None
        if acc.is_main_process:
            path = save_checkpoint(self.checkpoint_dir, self.global_step, self.unwrapped, self.optimizer,
                                   self.scheduler, state, c.save_total_limit, rngs)
        acc.wait_for_everyone()
        return path

    def maybe_resume(self) -> None:
        """Every process loads the checkpoint (written by the main process, or by all of
        them under FSDP / DeepSpeed), so the checkpoint directory must be shared."""
        c, acc = self.config, self.accelerator
        path = checkpoint_to_resume(c.resume, c.resume_from, self.checkpoint_dir, acc.print)
        if path is None:
            return
        # Each loader refuses a checkpoint of the other format with a message saying why.
        if distributed.sharded_states(acc):
            state = load_sharded_checkpoint(path, acc, self.scheduler)
        else:
            state = load_checkpoint(path, self.unwrapped, self.optimizer, self.scheduler,
                                    acc.process_index)
        self._restore(state)
        acc.print(f"resumed from {path} at step {self.global_step}")

    # -- the loop ---------------------------------------------------------------------
    def train(self) -> TrainResult:
        c, acc = self.config, self.accelerator
        self.maybe_resume()
        logger = MetricLogger(self.output_dir, acc.is_main_process, c.report_to,
                              resume_step=self.global_step)
        history: list[dict[str, Any]] = []
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", dynamic_ncols=True,
                   disable=not acc.is_main_process)
        started = time.perf_counter()
        try:
            while self.global_step < self.total_steps:
                lr = self.scheduler.get_last_lr()[0]
                self._train_step()
                record = None
                if self.global_step % c.logging_steps == 0 or self.global_step == self.total_steps:
                    epoch = self.consumed / len(self.train_features)
                    self.window.reduce(self.gather)
                    record = {"epoch": round(epoch, 4), "lr": lr, **self.window.means()}
                    if c.on_nonfinite == "skip":
                        record["skipped_steps"] = self.skipped  # the total so far
                    self.window.reset()
                    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", *self.algorithm.progress_keys)
                                     if isinstance(record.get(k), float)})
                if self.eval_features and c.eval_steps and self.global_step % c.eval_steps == 0:
                    record = {**(record or {"epoch": round(self.consumed / len(self.train_features), 4)}),
                              **self.evaluate()}
                if record is not None:
                    record["elapsed_s"] = round(time.perf_counter() - started, 3)
                    logger.log(self.global_step, record)
                    history.append({"step": self.global_step, **record})
                if c.save_steps and self.global_step % c.save_steps == 0:
                    self.save()
                bar.update(1)
            if self.eval_features and not (c.eval_steps and self.global_step % c.eval_steps == 0):
                record = {"epoch": round(self.consumed / len(self.train_features), 4), **self.evaluate()}
                logger.log(self.global_step, record)
                history.append({"step": self.global_step, **record})
        finally:
            bar.close()
            logger.close()
        if self.skipped:
            acc.print(f"skipped {self.skipped} of {self.total_steps} steps for a "
                      "non-finite loss or gradient")
        return TrainResult(step=self.global_step, output_dir=self.output_dir, history=history,
                           skipped_steps=self.skipped)

