"""Metric averaging and writing: metrics.jsonl always, TensorBoard or W&B on request."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prefalign.errors import ConfigError, write_files, writing

# Gathers one picklable object from every process: [object of rank 0, rank 1, ...].
Gather = Callable[[Any], list[Any]]


class MetricWindow:
    """Weighted means of per-micro-batch metrics over a logging window.

    Each micro-batch reports means over its own rows; weighting them by the number of rows
    gives the mean over every row of the window, whatever the micro-batch sizes. Tensors
    are summed on their device and read once per log, so logging adds no per-step sync.

    Under data parallelism each process holds the sums of its own rows; `reduce(gather)`
    replaces them by the sums over every process, so the means are those of the global
    batch however unevenly rows were shared. It costs one collective per log, not per step.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, Any], weight: float = 1.0) -> None:
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().mean()
            self.sums[name] = self.sums.get(name, 0.0) + value * weight
            self.weights[name] += weight

    def means(self) -> dict[str, float]:
        return {k: float(self.sums[k]) / self.weights[k] for k in self.sums if self.weights[k] > 0}

    def totals(self, gather: Gather | None = None) -> dict[str, dict[str, float]]:
        """Sums and weights as plain numbers; with `gather`, added up over every process.

        gather(obj) -> [obj of every process]: a process that saw no row of a metric (e.g.
        KTO's rewards/chosen) simply contributes nothing to it.
        """
        local = {k: (float(v), self.weights[k]) for k, v in self.sums.items()}
        parts = gather(local) if gather is not None else [local]
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for part in parts:
            for name, (value, weight) in part.items():
                sums[name] = sums.get(name, 0.0) + value
                weights[name] = weights.get(name, 0.0) + weight
        return {"sums": sums, "weights": weights}

    def reduce(self, gather: Gather | None) -> None:
        """Replace this process's sums by those over every process (all must call it)."""
        if gather is not None:
            self.load_state(self.totals(gather))

    def state(self, gather: Gather | None = None) -> dict[str, dict[str, float]]:
        """Plain numbers, for checkpoints: a resumed window continues the same averages.
        With `gather`, the totals over every process (restore them on one process only)."""
        return self.totals(gather)

    def load_state(self, state: dict[str, dict[str, float]]) -> None:
        self.sums = dict(state.get("sums", {}))
        self.weights = defaultdict(float, state.get("weights", {}))

    def reset(self) -> None:
        self.sums.clear()
        self.weights.clear()


class MetricLogger:
    """Writes one JSON object per logged step to OUTPUT/metrics.jsonl (main process only)."""

    def __init__(self, output_dir: Path, enabled: bool, tracker: str = "none",
                 resume_step: int = 0, run_config: dict | None = None) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tracker = None
        if not enabled:
            return
        with writing(self.path):
            output_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_step)
        if tracker == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("report_to tensorboard needs the tensorboard package: "
                                  "pip install tensorboard") from None
            self.tracker = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        elif tracker == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to wandb needs the wandb package: pip install wandb") from None
            self.tracker = wandb.init(dir=str(output_dir), config=run_config or {}, resume="allow")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one run."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text("utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the valid part
        # Replaced whole, so a full disk cannot leave the metrics of earlier steps cut off.
        write_files({self.path: "".join(k + "\n" for k in keep)})

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in record.items()}}
        with writing(self.path), self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if hasattr(self.tracker, "add_scalar"):
                for name, value in numbers.items():
                    self.tracker.add_scalar(name, value, step)
            else:
                self.tracker.log(numbers, step=step)

    def close(self) -> None:
        if self.tracker is not None:
            (getattr(self.tracker, "close", None) or self.tracker.finish)()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of invalid JSON
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file (a cut last line is ignored)."""
    records = []
    for line in Path(path).read_text("utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
