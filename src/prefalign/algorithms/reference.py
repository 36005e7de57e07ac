"""Reference-model log-probs: adapters disabled, a frozen copy, or precomputed on disk."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefalign.logprobs import LogpsModel
from prefalign.lora import disable_adapters
from prefalign.train.distributed import prepare_frozen


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

    def prepare(self, accelerator: Accelerator) -> ReferenceScorer:
        """Place the frozen copy for the engine in use: on the device (one process, DDP),
        sharded like the policy (FSDP, ZeRO-3). The LoRA reference needs nothing: it is
        the prepared policy itself, whose adapters are found through any wrapper."""
        if self.frozen is not None:
            self.frozen = prepare_frozen(self.frozen, accelerator)
        return self

    @torch.no_grad()
    def __call__(self, policy: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 completion_mask: Tensor, **kwargs) -> Tensor:
        """kwargs go to the LogpsModel call (e.g. `packed` for prefix-shared batches)."""
        if self.frozen is not None:
            return self.frozen(input_ids, attention_mask, completion_mask, **kwargs).logps
        with disable_adapters(policy), eval_mode(policy):
            return policy(input_ids, attention_mask, completion_mask, **kwargs).logps


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
    so changed data or another reference never reads stale numbers. Under data
    parallelism each process scores every P-th pair and the results are gathered; the
    main process alone reads and writes the cache and shares what it read, so processes
    need not share a disk.
    """
    state = PartialState()
    path = cache_dir / f"ref_logps-{_fingerprint(features, identity)}.safetensors"
    cached = None
    if state.is_main_process and path.is_file():
        cached = load_file(str(path))["logps"]
        cached = cached if cached.shape == (len(features), 2) else None
    if state.num_processes > 1:
        cached = broadcast_object_list([cached])[0]
    if cached is not None:
        return cached
    local = _score_shard(features[state.process_index :: state.num_processes], features[:1],
                         math.ceil(len(features) / state.num_processes), reference, policy,
                         collate, batch_size, device, not state.is_main_process)
    result = local
    if state.num_processes > 1:
        result = torch.empty(len(features), 2)
        for rank, part in enumerate(gather_object([local])):
            result[rank :: state.num_processes] = part
    if state.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"logps": result.contiguous()}, str(tmp))
        tmp.replace(path)
    state.wait_for_everyone()
    return result


def _score_shard(shard, stand_in, largest, reference, policy, collate, batch_size, device,
                 quiet) -> Tensor:
    """(len(shard), 2) log-probs. Every process runs ceil(largest / batch_size) batches, a
    stand-in row when its shard has run out, since sharded engines gather weights in
    every forward and a process skipping one would leave the others waiting."""
    rows = []
    for start in tqdm(range(0, largest, batch_size), desc="reference log-probs",
                      dynamic_ncols=True, disable=quiet):
        part = shard[start : start + batch_size]
        batch = collate(part or stand_in)
        inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")]
        logps = reference(policy, *inputs).float().cpu()
        half = logps.shape[0] // 2
        if part:
            rows.append(torch.stack([logps[:half], logps[half:]], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def attach_reference_logps(features: list[dict[str, Any]], logps: Tensor) -> None:
    for feature, (chosen, rejected) in zip(features, logps.tolist()):
        feature["ref_chosen_logps"] = chosen
        feature["ref_rejected_logps"] = rejected
