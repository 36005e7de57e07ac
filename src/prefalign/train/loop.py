"""The one training loop. It knows nothing of algorithms.

An algorithm supplies `collate(features) -> batch`, `units(features) -> float` (the count
its loss is a mean over: pairs, rows or tokens) and `compute_loss(model, batch) ->
(loss, metrics)`. The loop does the rest: shuffling, accumulation, clipping, schedule,
evaluation, checkpoints, exact resume, metrics and the progress bar, on CPU, one GPU or
under `accelerate launch`.

Accumulation is exact: each micro-batch's mean loss is weighted by its share of the units
of the whole optimizer step (across processes), so 1 x 8 accumulated equals 8 x 1 even
when micro-batches differ in size or the loss is a mean over tokens.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from prefalign.errors import PrefalignError
from prefalign.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from prefalign.train.config import TrainConfig
from prefalign.train.metrics import MetricLogger, MetricWindow

Features = list[dict[str, Any]]


class Algorithm(Protocol):
    progress_keys: tuple[str, ...]

    def collate(self, features: Features) -> dict[str, Any]: ...

    def units(self, features: Features) -> float: ...

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]
                     ) -> tuple[torch.Tensor, dict[str, Any]]: ...


class NonFiniteLoss(PrefalignError):
    pass


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    if mixed_precision == "auto":
        fast_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if fast_bf16 else "no"
    return Accelerator(mixed_precision=mixed_precision)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


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
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.unwrapped = model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise PrefalignError("the model has no trainable parameters")
        self.params = params
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.total_steps = self._total_steps()
        warmup = math.ceil(config.warmup_ratio * self.total_steps)
        name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
        self.scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.window = MetricWindow()
        self.step = 0
        self.consumed = 0  # examples consumed, all epochs, all processes

    # -- data -------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        c = self.config
        per_step = getattr(self.algorithm, "minibatches_per_step", 1)
        return c.batch_size * c.grad_accum * self.accelerator.num_processes * per_step

    def _total_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        per_epoch = math.ceil(len(self.train_features) / self.global_batch)
        return per_epoch * self.config.epochs

    def _next_window(self) -> tuple[list[Features], float, list[Any]]:
        """This process's micro-batches for the next step, the step's total units, its ids.

        Windows never cross an epoch boundary: the last one of an epoch may be smaller.
        """
        n = len(self.train_features)
        epoch, offset = divmod(self.consumed, n)
        order = epoch_order(n, self.config.seed, epoch)[offset : offset + self.global_batch]
        self.consumed += len(order)
        window = [self.train_features[i] for i in order]
        shares = split_window(window, self.config.batch_size, self.accelerator.num_processes)
        units = float(sum(self.algorithm.units(s) for micro in shares for s in micro if s))
        rank = self.accelerator.process_index
        return [micro[rank] for micro in shares if micro[rank]], units, order

    # -- one step ---------------------------------------------------------------------
    def _train_step(self) -> None:
        """One step: by default one optimizer update over the window.

        An algorithm with `plan(model, micro_batches)` (PPO) turns the window into several
        updates instead (e.g. rollouts, then epochs of mini-batches); it yields
        (micro-batches of this process, units of the update across processes) per update,
        and may stop early. `pop_metrics()` adds per-step metrics (e.g. rollout scores).
        """
        micro, total_units, ids = self._next_window()
        self.model.train()
        plan = getattr(self.algorithm, "plan", None)
        updates = plan(self.model, micro) if plan else [(micro, total_units)]
        for update_micro, update_units in updates:
            self._update(update_micro, update_units, ids)
        pop_metrics = getattr(self.algorithm, "pop_metrics", None)
        if pop_metrics:
            self.window.add(pop_metrics(), weight=1.0)
        self.scheduler.step()
        self.step += 1

    def _update(self, micro: list[Features], total_units: float, ids: list[int]) -> None:
        """Accumulate gradients over `micro` (this process's micro-batches), then step."""
        acc = self.accelerator
        loss_sum = torch.zeros((), device=acc.device)
        for k, features in enumerate(micro):
            units = self.algorithm.units(features)
            batch = to_device(self.algorithm.collate(features), acc.device)
            sync = k == len(micro) - 1
            with nullcontext() if sync else acc.no_sync(self.model), acc.autocast():
                loss, metrics = self.algorithm.compute_loss(self.model, batch)
                # DDP averages gradients over processes: scale the share back up by P.
                share = units / total_units if total_units else 0.0  # no loss tokens at all
                acc.backward(loss * share * acc.num_processes)
            loss_sum = loss_sum + loss.detach() * units
            self.window.add({"loss": loss.detach(), **metrics}, weight=units)
        grad_norm = None
        if self.config.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.params, self.config.max_grad_norm)
        bad = not torch.isfinite(loss_sum).item()
        if grad_norm is not None and not bad:
            bad = not torch.isfinite(grad_norm).item()
            self.window.add({"grad_norm": grad_norm}, weight=1.0)
        if bad:
            self._stop_non_finite(ids)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _stop_non_finite(self, ids: list[int]) -> None:
        ckpts = list_checkpoints(self.checkpoint_dir)
        keep = f"last good checkpoint: {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        shown = [self.train_features[i].get("id", i) for i in ids[:16]]
        raise NonFiniteLoss(f"non-finite loss or gradient at step {self.step + 1} "
                            f"(examples {shown}{' ...' if len(ids) > 16 else ''}); {keep}. "
                            "Lower the learning rate or check these rows.")

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        acc = self.accelerator
        window = MetricWindow()
        self.model.eval()
        size = self.config.batch_size
        shard = self.eval_features[acc.process_index :: acc.num_processes]
        for start in range(0, len(shard), size):
            features = shard[start : start + size]
            batch = to_device(self.algorithm.collate(features), acc.device)
            with acc.autocast():
                loss, metrics = self.algorithm.compute_loss(self.model, batch)
            window.add({"loss": loss, **metrics}, weight=self.algorithm.units(features))
        return {f"eval/{k}": v for k, v in window.means().items()}

    # -- checkpoints ------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        state = {"consumed": self.consumed, "window": self.window.state(),
                 "total_steps": self.total_steps}
        if hasattr(self.algorithm, "state_dict"):
            state["algorithm"] = self.algorithm.state_dict()
        return state

    def save(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        path = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(self.checkpoint_dir, self.step, self.unwrapped,
                                   self.optimizer, self.scheduler, self._trainer_state(),
                                   self.config.save_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def maybe_resume(self) -> None:
        c = self.config
        if not (c.resume or c.resume_from):
            return
        if c.resume_from:
            path = Path(c.resume_from)
        else:
            found = list_checkpoints(self.checkpoint_dir)
            if not found:
                self.accelerator.print(f"no checkpoint in {self.checkpoint_dir}: starting fresh")
                return
            path = found[-1]
        state = load_checkpoint(path, self.unwrapped, self.optimizer, self.scheduler)
        self.step, self.consumed = state["step"], state["consumed"]
        self.window.load_state(state.get("window", {}))
        if "algorithm" in state:
            self.algorithm.load_state_dict(state["algorithm"])
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    # -- the loop ---------------------------------------------------------------------
    def train(self) -> TrainResult:
        c, acc = self.config, self.accelerator
        self.maybe_resume()
        logger = MetricLogger(self.output_dir, acc.is_main_process, c.report_to,
                              resume_step=self.step)
        history: list[dict[str, Any]] = []
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not acc.is_main_process)
        started = time.perf_counter()
        try:
            while self.step < self.total_steps:
                lr = self.scheduler.get_last_lr()[0]
                self._train_step()
                record = None
                if self.step % c.logging_steps == 0 or self.step == self.total_steps:
                    epoch = self.consumed / len(self.train_features)
                    record = {"epoch": round(epoch, 4), "lr": lr, **self.window.means()}
                    self.window.reset()
                    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", *self.algorithm.progress_keys)
                                     if isinstance(record.get(k), float)})
                if self.eval_features and c.eval_steps and self.step % c.eval_steps == 0:
                    record = {**(record or {"epoch": round(self.consumed / len(self.train_features), 4)}),
                              **self.evaluate()}
                if record is not None:
                    record["elapsed_s"] = round(time.perf_counter() - started, 3)
                    logger.log(self.step, record)
                    history.append({"step": self.step, **record})
                if c.save_steps and self.step % c.save_steps == 0:
                    self.save()
                bar.update(1)
            if self.eval_features and not (c.eval_steps and self.step % c.eval_steps == 0):
                record = {"epoch": round(self.consumed / len(self.train_features), 4), **self.evaluate()}
                logger.log(self.step, record)
                history.append({"step": self.step, **record})
        finally:
            bar.close()
            logger.close()
        return TrainResult(step=self.step, output_dir=self.output_dir, history=history)


def split_window(window: Features, batch_size: int, procs: int) -> list[list[Features]]:
    """Cut a step's examples into micro-batches, each into one share per process.

    (micro-batch k, process r) -> features; the last micro-batch may be smaller.
    """
    shares = []
    for start in range(0, len(window), batch_size * procs):
        chunk = window[start : start + batch_size * procs]
        size = math.ceil(len(chunk) / procs)
        shares.append([chunk[r * size : (r + 1) * size] for r in range(procs)])
    return shares
