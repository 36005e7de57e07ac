"""Reference-model log-probs: adapters disabled, a frozen copy, or precomputed on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefalign.logprobs import LogpsModel
from prefalign.lora import disable_adapters


@contextmanager
def eval_mode(model: nn.Module):
    """Dropout off for the reference pass, then back to whatever mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class ReferenceScorer:
    """Sequence log-probs (B,) under the reference, without gradients.

    model=None: the policy itself with its LoRA adapters disabled (same weights, no copy).
    Otherwise a frozen causal LM (e.g. a copy of the starting model) held separately.
    """

    def __init__(self, model: nn.Module | None, chunk_size: int | None = None) -> None:
        self.frozen = None
        if model is not None:
            model.requires_grad_(False)
            self.frozen = LogpsModel(model.eval(), chunk_size=chunk_size)

    def to(self, device: torch.device) -> ReferenceScorer:
        if self.frozen is not None:
            self.frozen.to(device)
        return self

    @torch.no_grad()
    def __call__(self, policy: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 completion_mask: Tensor) -> Tensor:
        if self.frozen is not None:
            return self.frozen(input_ids, attention_mask, completion_mask).logps
        with disable_adapters(policy), eval_mode(policy):
            return policy(input_ids, attention_mask, completion_mask).logps


def _fingerprint(features: list[dict[str, Any]], identity: str) -> str:
    digest = hashlib.sha256(identity.encode())
    for f in features:
        digest.update(json.dumps([f["prompt_input_ids"], f["chosen_input_ids"],
                                  f["rejected_input_ids"]]).encode())
    return digest.hexdigest()[:16]


def precompute_reference_logps(
    features: list[dict[str, Any]],
    reference: ReferenceScorer,
    policy: nn.Module,
    collate: Callable[[list[dict]], dict[str, Tensor]],
    batch_size: int,
    device: torch.device,
    cache_dir: Path,
    identity: str,
) -> Tensor:
    """(N, 2) reference log-probs [chosen, rejected] of every pair, cached on disk.

    The cache file name is a hash of the token ids and of `identity` (which reference),
    so changed data or another reference never reads stale numbers.
    """
    path = cache_dir / f"ref_logps-{_fingerprint(features, identity)}.safetensors"
    if path.is_file():
        cached = load_file(str(path))["logps"]
        if cached.shape == (len(features), 2):
            return cached
    rows = []
    for start in tqdm(range(0, len(features), batch_size), desc="reference log-probs",
                      dynamic_ncols=True):
        batch = collate(features[start : start + batch_size])
        inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")]
        logps = reference(policy, *inputs).float().cpu()
        half = logps.shape[0] // 2
        rows.append(torch.stack([logps[:half], logps[half:]], dim=1))
    result = torch.cat(rows)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logps": result.contiguous()}, str(tmp))
    tmp.replace(path)
    return result


def attach_reference_logps(features: list[dict[str, Any]], logps: Tensor) -> None:
    for feature, (chosen, rejected) in zip(features, logps.tolist()):
        feature["ref_chosen_logps"] = chosen
        feature["ref_rejected_logps"] = rejected
