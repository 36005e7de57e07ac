"""Reference log-probs: one interface (Reference), three small implementations and one
builder (make_reference).

  AdaptersOff       LoRA runs: the policy's own weights with its adapters disabled
  FrozenCopy        full fine-tuning or ref_model: a frozen model, prepared like the policy
  PrecomputedTable  precompute_ref: numbers computed once (cached on disk), looked up by
                    the rows' feature "index"; no reference model in memory while training
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefalign.logprobs import CompletionLogps, LogpsModel
from prefalign.lora import disable_adapters
from prefalign.train import distributed

if TYPE_CHECKING:
    from prefalign.train.run import Run


@contextmanager
def eval_mode(model: nn.Module):
    """Dropout off for the reference pass, then back to whatever mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Reference(Protocol):
    """Sequence log-probs (B,) of every row of a batch under the reference, without
    gradients and without writing into the features. Pairs: chosen rows, then rejected rows.

    policy: the model being trained (its adapters are switched off by AdaptersOff; the
    other references ignore it). index: the feature "index" of each example, one per pair
    for pairs (PrecomputedTable reads it). packed: the batch's packed / shared-prefix inputs.
    """

    def __call__(self, policy: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 completion_mask: Tensor, *, index: Tensor | None = None,
                 **packed: Any) -> Tensor: ...


class AdaptersOff:
    """The policy itself with its LoRA adapters disabled, in eval mode: the same weights,
    no second copy. The adapters are found through any wrapper (DDP, FSDP)."""

    @torch.no_grad()
    def score(self, policy: nn.Module, input_ids: Tensor, attention_mask: Tensor,
              completion_mask: Tensor, **kwargs: Any) -> CompletionLogps:
        """The whole result (token_logps too, which PPO's per-token KL reads)."""
        with disable_adapters(policy), eval_mode(policy):
            return policy(input_ids, attention_mask, completion_mask, **kwargs)

    def __call__(self, policy: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 completion_mask: Tensor, *, index: Tensor | None = None, **packed: Any) -> Tensor:
        return self.score(policy, input_ids, attention_mask, completion_mask, **packed).logps


class FrozenCopy:
    """A frozen causal LM held apart from the policy (a copy of the starting model, or
    ref_model), placed by train.distributed.prepare_frozen: on the device (one process,
    DDP), sharded like the policy (FSDP, ZeRO-3). accelerator=None: left where it is (a
    library caller on one device).

    base: the causal LM itself (its config tells whether it takes custom attention masks).
    """

    def __init__(self, model: nn.Module, accelerator: Accelerator | None = None,
                 chunk_size: int | None = None) -> None:
        self.base = model.requires_grad_(False).eval()
        scorer: nn.Module = LogpsModel(model, chunk_size=chunk_size)
        self.model = scorer if accelerator is None else distributed.prepare_frozen(scorer,
                                                                                  accelerator)

    @torch.no_grad()
    def score(self, policy: nn.Module | None, input_ids: Tensor, attention_mask: Tensor,
              completion_mask: Tensor, **kwargs: Any) -> CompletionLogps:
        return self.model(input_ids, attention_mask, completion_mask, **kwargs)

    def __call__(self, policy: nn.Module | None, input_ids: Tensor, attention_mask: Tensor,
                 completion_mask: Tensor, *, index: Tensor | None = None, **packed: Any) -> Tensor:
        return self.score(policy, input_ids, attention_mask, completion_mask, **packed).logps


class PrecomputedTable:
    """Reference log-probs computed once before training: table (N, k), row i for the
    feature whose "index" is i (k = 2 for pairs: chosen, rejected). No model is held."""

    def __init__(self, table: Tensor) -> None:
        self.table = table

    @classmethod
    def from_rows(cls, parts: Sequence[tuple[list[dict[str, Any]], Tensor]]) -> PrecomputedTable:
        """parts: (features, their (len(features), k) log-probs) -> one table by "index"."""
        parts = [(features, logps) for features, logps in parts if features]
        size = 1 + max(f["index"] for features, _ in parts for f in features)
        table = torch.zeros(size, parts[0][1].shape[1])
        for features, logps in parts:
            table[torch.tensor([f["index"] for f in features])] = logps.to(table)
        return cls(table)

    def __call__(self, policy: nn.Module | None, input_ids: Tensor, attention_mask: Tensor,
                 completion_mask: Tensor, *, index: Tensor | None = None, **packed: Any) -> Tensor:
        if index is None:
            raise ValueError("a precomputed reference needs the batch's row index")
        rows = self.table[index.cpu()]  # (B, k): each row's columns, e.g. chosen, rejected
        return rows.t().reshape(-1).to(input_ids.device)  # column by column: all chosen first


def make_reference(run: Run, config: Any,
                   precompute_for: Sequence[list[dict[str, Any]]] = ()) -> Reference | None:
    """The reference of a run, and the only place one is built:

      a reference-free loss           -> None
      precompute_ref                  -> PrecomputedTable over the features of
                                         `precompute_for`, computed with the reference below,
                                         which is then released (cached on disk)
      ref_model                       -> FrozenCopy of that model
      LoRA                            -> AdaptersOff (the policy without its adapters)
      full fine-tuning                -> FrozenCopy of the starting model (run.model)

    Every FrozenCopy is placed by train.distributed.prepare_frozen, whatever the trainer.
    """
    if getattr(config, "reference_free", False):
        return None
    live = live_reference(run, config)
    if not getattr(config, "precompute_ref", False):
        return live
    return _precompute(run, config, live, precompute_for)


def live_reference(run: Run, config: Any) -> AdaptersOff | FrozenCopy:
    """The reference that scores batches as they come (see make_reference)."""
    chunk = config.logps_chunk_size
    ref_model = getattr(config, "ref_model", None)
    if ref_model:
        return FrozenCopy(run.load_frozen(ref_model), run.accelerator, chunk)
    if run.is_lora:
        return AdaptersOff()
    # The starting weights, frozen: a second copy (precompute_ref avoids holding it).
    return FrozenCopy(copy.deepcopy(run.model), run.accelerator, chunk)


def _precompute(run: Run, config: Any, live: AdaptersOff | FrozenCopy,
                precompute_for: Sequence[list[dict[str, Any]]]) -> PrecomputedTable:
    from prefalign.data import collate_preferences
    from prefalign.models import model_reference

    pad = run.tokenizer.pad_token_id
    device = run.accelerator.device
    policy = LogpsModel(run.model, chunk_size=config.logps_chunk_size).to(device)
    # Which reference: the cache file's name depends on it, so another never reads stale numbers.
    identity = f"{config.ref_model or model_reference(config.model)}|lora={run.is_lora}"
    parts = [(features, precompute_reference_logps(
        features, live, policy, lambda f: collate_preferences(f, pad), config.batch_size,
        device, run.output_dir / "cache", identity)) for features in precompute_for if features]
    return PrecomputedTable.from_rows(parts)  # `live` (a frozen copy, if one) is released


def _fingerprint(features: list[dict[str, Any]], identity: str) -> str:
    digest = hashlib.sha256(identity.encode())
    for f in features:
        digest.update(json.dumps([f["prompt_input_ids"], f["chosen_input_ids"],
                                  f["rejected_input_ids"]]).encode())
    return digest.hexdigest()[:16]


def precompute_reference_logps(
    features: list[dict[str, Any]],
    reference: AdaptersOff | FrozenCopy,
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
