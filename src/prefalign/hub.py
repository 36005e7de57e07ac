"""Offline first: prefalign reaches the Hugging Face hub only when the user allows it.

Models and tokenizers load from local directories and from the local hub cache. A hub id
that is not cached is refused at once, naming it and the fix, instead of a minute of
retries; an adapter whose base model is a hub id makes no request either. Downloads are
allowed by `--allow-download` (the commands that load models; `allow_download: true` in a
trainer's config) or by `HF_HUB_OFFLINE=0` set explicitly in the environment.

huggingface_hub reads HF_HUB_OFFLINE once, when it is imported, so the `prefalign`
command calls offline_by_default() before it imports anything that imports it, and
allow_downloads() also updates the imported module. Python callers of the library are
offline first too: every model and tokenizer load passes `local_files_only` unless
downloads_allowed(); call allow_downloads() (or set HF_HUB_OFFLINE=0) to allow them.
This module imports nothing heavy (config: yaml): it runs before torch and transformers are
loaded.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from prefalign.config import Section, option

_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_allowed = False

DOWNLOAD_FIX = "pass --allow-download (or set HF_HUB_OFFLINE=0) to fetch it from the hub"
DOWNLOAD_HELP = ("allow fetching a model or tokenizer that is not local from the Hugging Face "
                 "hub (network); off: local directories and the local hub cache only, and an "
                 "uncached hub id is refused at once (HF_HUB_OFFLINE=0 in the environment "
                 "allows it too)")


def _environment_allows() -> bool:
    """True when the user set HF_HUB_OFFLINE to a false value (0, false, no, off)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


def downloads_allowed() -> bool:
    """Whether a model load may reach the hub: allow_downloads() ran, or HF_HUB_OFFLINE=0."""
    return _allowed or _environment_allows()


def _set(offline: bool) -> None:
    for name in _VARIABLES:
        os.environ[name] = "1" if offline else "0"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported already: it read the variable at import time
        constants.HF_HUB_OFFLINE = offline


def offline_by_default() -> None:
    """Switch the hub client off for this process unless the environment allows it."""
    if not downloads_allowed():
        _set(offline=True)


def allow_downloads() -> None:
    """Allow hub requests for the rest of this process (--allow-download)."""
    global _allowed
    _allowed = True
    _set(offline=False)


@dataclass(frozen=True)
class DownloadOption(Section):
    """`--allow-download`, for a command that loads models."""

    SECTION = "models"

    allow_download: bool = option(False, DOWNLOAD_HELP)


@dataclass(frozen=True)
class RemoteCodeOption(Section):
    """`--trust-remote-code`, for a command that loads models that may bring their code."""

    SECTION = "models"

    trust_remote_code: bool = option(False, "allow model code from the model directories "
                                     "to run")
