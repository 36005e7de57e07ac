"""Checkpoints that are complete or absent: written to a temp dir, then renamed.

A checkpoint holds what an exact resume needs: weights, optimizer, scheduler, every
process's RNG state and the data position. A directory without its `trainer_state.json`
(written last, inside the temp dir) is never picked up; temp dirs that a crash or kill -9
left behind are deleted by the next save. A failed write (disk full, read-only folder)
removes its temp dir and raises a one-line OutputError; earlier checkpoints stay as they
were.

Two formats, by engine; the `format` field of trainer_state.json says which one it is:

  "safetensors" (one process, DDP): the main process writes trainable.safetensors (the
      trainable parameters only: the adapter for LoRA runs, the whole model otherwise),
      optimizer.pt, scheduler.pt, rng.pt (+ rng-R.pt for process R > 0). Under DDP every
      process holds the same weights and optimizer state, so one copy serves all of them.
  "accelerate" (FSDP, DeepSpeed): weights (FSDP, ZeRO-3) or optimizer states (ZeRO-1/2)
      are split across processes, so every process writes its part through
      `Accelerator.save_state` (model, optimizer and random states in accelerate's layout:
      sharded or full per the FSDP plugin's state_dict_type, DeepSpeed's own otherwise),
      beside scheduler.pt; `Accelerator.load_state` reads it back.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prefalign.errors import PrefalignError, disk_error, output_error, writing
from prefalign.safetensors_files import file_problem as safetensors_problem

STATE_FILE = "trainer_state.json"
TEMP_PREFIX = ".step-"  # checkpoints are written under this name, then renamed to step-N
KEPT = " (earlier checkpoints are intact: continue from the newest with --resume)"
SAFETENSORS, ACCELERATE = "safetensors", "accelerate"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that training changes, by name (LoRA runs: only the adapter)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically ("safetensors" format) and keep the newest `keep`.

    rng_states: every process's RNG state in rank order (default: this process's only).
    """
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{step:07d}-", dir=root))
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        for rank, state in enumerate(rng_states or [rng_state()]):
            _save_torch(state, tmp / _rng_file(rank))
    except Exception as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what a full disk let us write
        error = disk_error(exc)  # safetensors raises SafetensorError for a full disk
        if error is None:
            raise
        raise output_error(root / f"step-{step:07d}", error, KEPT) from None
    return _complete(root, tmp, step, scheduler, {**trainer_state, "format": SAFETENSORS}, keep)


def save_sharded_checkpoint(root: Path, step: int, accelerator: Any, scheduler: Any,
                            trainer_state: dict[str, Any], keep: int) -> Path | None:
    """The "accelerate" format; every process calls it. -> the path (main process), else None.

    All processes write their parts into one temp dir with a fixed name, so each knows it.
    """
    tmp = root / f"{TEMP_PREFIX}{step:07d}.partial"
    with writing(root / f"step-{step:07d}", KEPT):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        path = _complete(root, tmp, step, scheduler, {**trainer_state, "format": ACCELERATE}, keep)
    accelerator.wait_for_everyone()
    return path


def _complete(root: Path, tmp: Path, step: int, scheduler: Any, trainer_state: dict[str, Any],
              keep: int) -> Path:
    """Add scheduler and trainer state to `tmp`, rename it to step-N, delete old ones."""
    final = root / f"step-{step:07d}"
    try:
        _save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}), "utf-8")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = disk_error(exc)
        if error is None:
            raise
        raise output_error(final, error, KEPT) from None
    for old in list_checkpoints(root)[:-keep] + _stale_temps(root):
        shutil.rmtree(old, ignore_errors=True)
    return final


def _stale_temps(root: Path) -> list[Path]:
    """Temp dirs of saves a crash or kill -9 cut short: never loaded, only taking space.
    Called by the one writer after its own temp dir was renamed, so none is in use."""
    return [p for p in root.iterdir() if p.name.startswith(TEMP_PREFIX) and p.is_dir()]


@contextmanager
def replaced_whole(directory: Path) -> Iterator[Path]:
    """Yield a temp sibling of `directory` to write into; on success it becomes `directory`
    (replacing an earlier one), on failure it is deleted. A reader, or a kill -9, finds the
    old complete directory or the new one, never a partial one.

    The final model uses it: a run killed while saving it leaves the previous final/ (or
    none) and its checkpoints, and the same command with --resume writes it again.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _Writer:
    """An unbuffered file for torch.save that keeps the OSError of a failed write.

    torch.save to a path reports a full disk as RuntimeError("... unexpected pos 576 vs
    534"), without the reason; through this object the write's own OSError (ENOSPC, EROFS)
    is kept and raised instead. Writes loop until every byte is out, since a raw write may
    take only part of it.
    """

    def __init__(self, handle: Any):
        self.handle, self.error = handle, None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                written = self.handle.write(view[done:])
                if not written:
                    raise OSError(errno.EIO, "the file took no bytes")
                done += written
        except OSError as exc:
            self.error = exc
            raise
        return done

    def flush(self) -> None:
        pass  # unbuffered; the caller fsyncs the file


def _save_torch(obj: Any, path: Path) -> None:
    """torch.save(obj, path); a failed write raises its OSError (see _Writer)."""
    with open(path, "wb", buffering=0) as handle:
        writer = _Writer(handle)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir() if path.is_dir() else []:
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        elif file.is_dir():
            _fsync_dir(file)  # accelerate's layout has folders (sharded model, optimizer)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded, or None when it is whole.

    Catches what a crash, a full disk or a copy cut short leaves: a missing or cut
    trainer_state.json, a truncated trainable.safetensors (its header's sizes do not add
    up to the file's) and a truncated optimizer, scheduler or RNG file (torch.save writes
    zip archives, whose directory sits at the end). Reads headers, not the weights.
    """
    try:
        state = json.loads((path / STATE_FILE).read_text("utf-8"))
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{STATE_FILE} is cut short or not JSON"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} has no step"
    files = [path / "scheduler.pt"]
    if state.get("format", SAFETENSORS) == SAFETENSORS:
        problem = safetensors_problem(path / "trainable.safetensors")
        if problem:
            return problem
        files += [path / "optimizer.pt", path / "rng.pt", *sorted(path.glob("rng-*.pt"))]
    for file in files:
        if not file.is_file():
            return f"{file.name} is missing"
        if not zipfile.is_zipfile(file):
            return f"{file.name} is cut short or damaged"
    return None


def newest_intact(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint that checkpoint_problem finds whole, and the newer
    ones it skipped, each with the reason: (path or None, [(skipped path, why), ...])."""
    skipped = []
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def read_trainer_state(path: Path) -> dict[str, Any]:
    if not (path / STATE_FILE).is_file():
        raise PrefalignError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text("utf-8"))
    state.setdefault("format", SAFETENSORS)  # written before formats were named
    return state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, rank: int = 0) -> dict[str, Any]:
    """Restore a "safetensors" checkpoint: weights, optimizer, scheduler and this process's
    RNG (rank R reads rng-R.pt, or rng.pt when the run had fewer processes)."""
    state = _expect_format(path, SAFETENSORS)
    problem = safetensors_problem(path / "trainable.safetensors")
    if problem is not None:
        raise PrefalignError(f"checkpoint {path}: {problem}; resume from an intact checkpoint")
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or set(weights) - set(params):
        raise PrefalignError(f"checkpoint {path} does not match this model "
                             f"(e.g. {(missing or sorted(set(weights) - set(params)))[0]}); "
                             "resume with the same model and LoRA settings")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise PrefalignError(_shape_mismatch(path, name, tuple(value.shape),
                                                 tuple(params[name].shape)))
    # Everything is read and checked before the model, optimizer or RNG changes.
    rng = path / _rng_file(rank)
    optimizer_state = _read_state(path / "optimizer.pt")
    scheduler_state = _read_state(path / "scheduler.pt")
    rng_state = _read_state(rng if rng.is_file() else path / "rng.pt")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError) as exc:
        raise PrefalignError(f"checkpoint {path}/optimizer.pt does not fit this run's optimizer "
                             f"({str(exc).splitlines()[0]}); resume with the same model and "
                             "settings") from None
    scheduler.load_state_dict(scheduler_state)
    set_rng_state(rng_state)
    return state


def _shape_mismatch(path: Path, name: str, saved: tuple, model: tuple) -> str:
    """The one-line error for a checkpoint tensor whose shape is not the model's; for LoRA
    factors (A: r x in, B: out x r) it names both ranks."""
    rank_axis = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
    if rank_axis is not None and len(saved) == len(model) == 2:
        return (f"checkpoint {path} holds LoRA rank {saved[rank_axis]} ({name}: {list(saved)}) "
                f"but this run's model has rank {model[rank_axis]} (lora_r); resume with "
                f"lora_r {saved[rank_axis]}, or start a new run for rank {model[rank_axis]}")
    return (f"checkpoint {path} does not match this model: {name} has shape {list(saved)} "
            f"there and {list(model)} here; resume with the same model and settings")


def _read_state(file: Path) -> Any:
    """torch.load(file) of a checkpoint's optimizer, scheduler or RNG state. weights_only:
    only tensors, numbers, strings and containers of them are read; a pickle of any other
    object is refused unread, since unpickling it could run code."""
    # torch raises pickle.UnpicklingError for it; named through torch, so that this module
    # imports no unpickler of its own.
    refused = torch.serialization.pickle.UnpicklingError
    try:
        return torch.load(file, weights_only=True)
    except refused:
        raise PrefalignError(f"checkpoint file {file} holds objects other than tensors, numbers "
                             "and strings; refused without unpickling them (that could run "
                             "code): resume from a checkpoint prefalign wrote") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise PrefalignError(f"checkpoint file {file} cannot be read ({str(exc).splitlines()[0]}); "
                             "resume from an intact checkpoint") from None


def load_sharded_checkpoint(path: Path, accelerator: Any, scheduler: Any) -> dict[str, Any]:
    """Restore an "accelerate" checkpoint; every process calls it."""
    state = _expect_format(path, ACCELERATE)
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return state


def _expect_format(path: Path, expected: str) -> dict[str, Any]:
    state = read_trainer_state(path)
    if state["format"] != expected:
        engines = {SAFETENSORS: "one process or DDP", ACCELERATE: "FSDP or DeepSpeed"}
        raise PrefalignError(f"checkpoint {path} was written under {engines[state['format']]} "
                             f"({state['format']} format) and this run uses {engines[expected]}; "
                             "resume under the same kind of launch")
    return state
