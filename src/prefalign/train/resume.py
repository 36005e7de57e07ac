"""Which checkpoint `--resume` / `--resume-from` continues from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefalign.errors import PrefalignError
from prefalign.train.checkpoint import checkpoint_problem, newest_intact


def checkpoint_to_resume(resume: bool, resume_from: str | None, checkpoint_dir: Path,
                         log: Callable[[str], None]) -> Path | None:
    """The checkpoint to load, or None to start fresh.

    resume_from: that checkpoint, which must be intact. resume: the newest intact one in
    checkpoint_dir, falling back past damaged ones (each named through `log`); none there
    starts fresh, but only damaged ones there is an error (they may hold the only progress).
    """
    if resume_from:
        path = Path(resume_from)
        problem = checkpoint_problem(path)
        if problem:
            raise PrefalignError(f"checkpoint {path} cannot be loaded: {problem}; choose "
                                 "another with --resume-from, or --resume for the newest "
                                 "intact one")
        return path
    if not resume:
        return None
    path, skipped = newest_intact(checkpoint_dir)
    for bad, why in skipped:  # a damaged newest checkpoint: fall back to an older one
        log(f"skipped checkpoint {bad}: {why}")
    if path is None and skipped:
        names = ", ".join(f"{p.name} ({why})" for p, why in skipped)
        raise PrefalignError(f"no intact checkpoint in {checkpoint_dir}: {names}; "
                             "restore one, or start over with --overwrite")
    if path is None:
        log(f"no checkpoint in {checkpoint_dir}: starting fresh")
    return path
