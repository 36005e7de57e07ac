"""Guards on an output directory, checked before anything is written into it.

Three ways a run used to lose or mix work, each now refused with one line naming the path
or key and the fix:

  overlap    the output dir equals, contains or lies inside one of the run's inputs (model,
             reference, reward or value model, data): the run would overwrite what it reads,
             e.g. `--model runs/sft/final --output-dir runs/sft` replaced the SFT adapter
             by one naming itself as its base.
  reuse      a new run in the folder of an earlier one truncated its metrics.jsonl and mixed
             its checkpoints with the new ones: a non-empty output dir needs --resume
             (continue) or --overwrite (remove the earlier run's files first).
  drift      --resume with other settings than the saved config.yaml continued a run that no
             single config describes: every changed key outside SAFE_ON_RESUME is refused.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from prefalign.errors import ConfigError

# Config keys that name something a run reads, with the flag that sets each.
INPUT_KEYS = {"model": "--model", "ref_model": "--ref-model", "reward_model": "--reward-model",
              "value_model": "--value-model", "data": "--data", "eval_data": "--eval-data",
              "scorer": "--scorer", "chat_template": "--chat-template"}

# What prefalign's trainers (and iterate) write into an output dir; --overwrite removes
# these and nothing else.
RUN_FILES = frozenset({"config.yaml", "run.log", "metrics.jsonl", "samples.jsonl", "rounds.jsonl",
                       "checkpoints", "final", "final-merged", "final-eval", "cache",
                       "tensorboard", "wandb"})
# round-R/ (iterate), temp and old copies of final/ (checkpoint.replaced_whole), the temp
# file of a truncated metrics.jsonl (metrics.MetricLogger).
RUN_PATTERNS = (re.compile(r"^round-\d+$"), re.compile(r"^\.final(-merged)?\.(tmp|old)-"),
                re.compile(r"^metrics\.jsonl\.tmp$"))

# Keys that may differ between a run and its --resume: they change how often the run logs,
# evaluates and saves, where it reports, or how it spends memory, never what it computes.
SAFE_ON_RESUME = frozenset({"logging_steps", "eval_steps", "save_steps", "save_total_limit",
                            "report_to", "output_dir", "resume", "resume_from", "overwrite",
                            "gradient_checkpointing", "logps_chunk_size", "trust_remote_code",
                            "allow_download"})
# Keys that may grow on resume (train longer), never shrink.
GROW_ON_RESUME = frozenset({"max_steps", "epochs"})


def resolved(path: str | os.PathLike) -> Path:
    """Absolute, with symlinks and `..` resolved, so two spellings of a folder compare equal."""
    return Path(path).expanduser().resolve()


def check_no_overlap(output_dir: str | os.PathLike, inputs: Mapping[str, Any],
                     flag: str = "--output-dir") -> None:
    """Refuse an output dir that equals, contains or lies inside an input.

    inputs: label (e.g. "--model") -> path. Values that are not local paths (a hub id, a
    scorer spec, an in-memory list) are skipped: nothing on disk can be overwritten.
    """
    out = resolved(output_dir)
    for label, value in inputs.items():
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            continue
        if not Path(value).expanduser().exists():
            continue
        path = resolved(value)
        if out == path:
            relation = "is"
        elif path.is_relative_to(out):
            relation = "contains"
        elif out.is_relative_to(path):
            relation = "lies inside"
        else:
            continue
        raise ConfigError(f"{flag} {output_dir} {relation} the input {label} {value}: the run "
                          f"would write over what it reads; choose an {flag} outside it")


def config_inputs(config: Any) -> dict[str, Any]:
    """label -> path of each input a trainer config names (see INPUT_KEYS)."""
    return {flag: getattr(config, key) for key, flag in INPUT_KEYS.items()
            if getattr(config, key, None)}


def is_run_file(name: str) -> bool:
    return name in RUN_FILES or any(p.match(name) for p in RUN_PATTERNS)


def _names(paths: list[Path], limit: int = 6) -> str:
    shown = [p.name + ("/" if p.is_dir() else "") for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(shown) + more


def prepare_output_dir(config: Any, log: Callable[[str], Any] = print) -> None:
    """Check `config.output_dir` before a run writes into it (main process only).

    - an input overlaps it: refused (always);
    - resume / resume_from: the settings must match the saved config.yaml (SAFE_ON_RESUME
      and GROW_ON_RESUME excepted);
    - otherwise it must be empty or absent, unless overwrite: then the earlier run's files
      (RUN_FILES, RUN_PATTERNS) are removed, named in one line; a file no run writes is
      never removed, and its presence is refused, naming it.
    """
    out = Path(config.output_dir)
    check_no_overlap(out, config_inputs(config))
    if getattr(config, "resume", False) or getattr(config, "resume_from", None):
        check_same_settings(out / "config.yaml", config)
        return
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    unknown = [p for p in entries if not is_run_file(p.name)]
    if unknown:
        what = (f"--overwrite removes only a run's files, and --output-dir {out} also holds"
                if config.overwrite else f"--output-dir {out} holds files no run writes:")
        raise ConfigError(f"{what} {_names(unknown)}; move them away or choose an empty or "
                          "new --output-dir")
    if not config.overwrite:
        raise ConfigError(f"--output-dir {out} already holds a run ({_names(entries)}); "
                          "continue it with --resume, start over with --overwrite (removes "
                          "those files), or choose another --output-dir")
    log(f"--overwrite: removing the earlier run's {_names(entries, len(entries))} from {out}")
    for path in entries:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: old -> new' for each key both mappings hold whose change is not safe on resume.

    Keys only one side has (options added or removed between versions) are not compared;
    input paths that resolve to the same file are the same.
    """
    changes = []
    for key, new in current.items():
        if key not in saved or key in SAFE_ON_RESUME:
            continue
        old = saved[key]
        if old == new:
            continue
        if (key in INPUT_KEYS and isinstance(old, str) and isinstance(new, str) and old and new
                and resolved(old) == resolved(new)):
            continue
        if (key in GROW_ON_RESUME and isinstance(old, int) and isinstance(new, int)
                and new > old):
            continue
        changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


def check_same_settings(saved_path: Path, config: Any) -> None:
    """Refuse a resume whose settings differ from the run's saved config.yaml (if any)."""
    from prefalign.config import config_to_dict

    if not saved_path.is_file():
        return  # nothing ran here yet (or a version that wrote no config): nothing to differ
    try:
        saved = yaml.safe_load(saved_path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{saved_path} cannot be read ({type(exc).__name__}), so --resume "
                          "cannot check that the settings are the run's; restore it or start "
                          "over with --overwrite") from None
    if not isinstance(saved, dict):
        return
    # Through YAML and back, so both sides have the same types (tuples as lists, ...).
    current = yaml.safe_load(yaml.safe_dump(config_to_dict(config)))
    changes = changed_settings(saved, current)
    if changes:
        raise ConfigError(f"--resume with other settings than {saved_path} ({'; '.join(changes)}): "
                          "resume with the saved values, or start a new run in another "
                          "--output-dir (or --overwrite this one)")
