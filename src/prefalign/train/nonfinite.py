"""A NaN or inf loss or gradient: stop naming the step and its examples, or skip the step.

Under on_nonfinite "stop" (the default) the run ends with NonFiniteLoss, naming the step,
its example ids and the last good checkpoint. Under "skip" the optimizer step is dropped
(its gradients and metrics too) and counted, unless max_skipped_in_a_row steps in a row
were already skipped. Every process decides alike (see all_finite), so all stop together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from prefalign.errors import PrefalignError
from prefalign.train.checkpoint import list_checkpoints


class NonFiniteLoss(PrefalignError):
    pass


def all_finite(accelerator: Accelerator, loss_sum: torch.Tensor, grad_norm: Any) -> bool:
    """Whether loss and gradient norm are finite on every process, so that all of them
    stop together (one stopping alone would leave the others waiting)."""
    finite = torch.isfinite(loss_sum).float()
    if grad_norm is not None:
        finite = finite * torch.isfinite(torch.as_tensor(grad_norm, device=finite.device))
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite.reshape(1), reduction="sum")
    return bool(finite.sum().item() == accelerator.num_processes)


class NonFiniteGuard:
    """Counts skipped steps; `handle` raises NonFiniteLoss or records one more skip."""

    def __init__(self, mode: str, max_in_a_row: int, checkpoint_dir: Path,
                 main_process: bool) -> None:
        self.mode = mode
        self.max_in_a_row = max_in_a_row
        self.checkpoint_dir = checkpoint_dir
        self.main_process = main_process
        self.skipped = 0  # optimizer steps dropped for a non-finite loss or gradient
        self.skipped_in_a_row = 0

    def handle(self, step: int, shown_ids: Sequence[Any], more: bool) -> None:
        """Step `step` (1-based) was not finite: raise, or count it as skipped (the caller
        drops its gradients and metrics). shown_ids: the first example ids of the step."""
        what = (f"non-finite loss or gradient at step {step} "
                f"(examples {list(shown_ids)}{' ...' if more else ''})")
        skip = self.mode == "skip"
        if skip and self.skipped_in_a_row < self.max_in_a_row:
            self.skipped += 1
            self.skipped_in_a_row += 1
            if self.main_process:
                tqdm.write(f"{what}: skipped this step ({self.skipped} skipped so far)")
            return
        if skip:
            what += f", after {self.max_in_a_row} skipped steps in a row"
        ckpts = list_checkpoints(self.checkpoint_dir)
        keep = f"last good checkpoint: {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        raise NonFiniteLoss(f"{what}; {keep}. Lower the learning rate or check these rows.")

    def passed(self) -> None:
        """A finite step: the count of skips in a row starts over."""
        self.skipped_in_a_row = 0

    def state(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state(self, state: dict[str, Any]) -> None:
        # Absent in checkpoints of older versions.
        self.skipped = state.get("skipped_steps", 0)
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)
