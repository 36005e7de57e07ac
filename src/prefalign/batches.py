"""Typed batches: what an algorithm's `collate` returns and its `compute_loss` reads.

Shapes: B examples (pairs for preference batches), T token positions. `input_ids` (long),
`attention_mask` (long, 1 = real token) and `completion_mask` (bool, True = scored) are the
scored layout, the one the losses read. `packed` (packing.PackedInputs) is the layout the
model reads instead when it differs (packing, prefix sharing); `packed_kwargs()` passes it
to a LogpsModel or RewardModel call. `index` (B,) long holds each example's row position
in the loaded data (a precomputed reference table is indexed by it); None when the
features carry no "index". `stand_in` is True on the training loop's zero-weight stand-in
micro-batch (see train.loop), which algorithms that exchange values across processes
must still run.

`.to(device)` returns the same batch with every tensor on `device`. A batch also reads
as a mapping of its present fields (`batch["input_ids"]`, `"label" in batch`, the packed
layout under flat `packed_*` names), which is how tests and tools inspect one; algorithms
read attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from prefalign.packing import PackedInputs, packed_keys

B = TypeVar("B", bound="Batch")


class Batch:
    """What every typed batch shares: device moves, packed kwargs, the mapping view."""

    def to(self: B, device: torch.device | str) -> B:
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), (Tensor, PackedInputs))}
        return dataclasses.replace(self, **moved)

    def packed_kwargs(self) -> dict[str, PackedInputs]:
        """{"packed": PackedInputs} when the model reads another layout, else {}."""
        packed = getattr(self, "packed", None)
        return {} if packed is None else {"packed": packed}

    def inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids, attention_mask, completion_mask): a LogpsModel's positional inputs."""
        return self.input_ids, self.attention_mask, self.completion_mask

    def _present(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PackedInputs):
                out.update(packed_keys(value))
            elif value is not None and f.name != "stand_in":
                out[f.name] = value
        return out

    def __getitem__(self, key: str) -> Any:
        return self._present()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._present()

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def keys(self) -> list[str]:
        return list(self._present())


@dataclass
class PreferenceBatch(Batch):
    """B pairs as 2B rows: rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected.

    input_ids, attention_mask, completion_mask (2B, T).
    index (B,) long; margin (B,) float, 0.0 where a row has none; weight (B,) float, 1.0
    where a row has none (None when no feature has the column); source, id: B values.
    packed: prefix-shared [prompt | chosen | rejected] rows, one per pair.
    Reward models read this batch too: the reward of row r is read at one position.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    index: Tensor | None = None
    margin: Tensor | None = None
    weight: Tensor | None = None
    source: list | None = None
    id: list | None = None
    packed: PackedInputs | None = None
    stand_in: bool = False

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2


@dataclass
class UnpairedBatch(Batch):
    """B (prompt, completion, label) rows for KTO, and their KL rows.

    input_ids, attention_mask, completion_mask (B, T); label (B,) bool, True = desirable.
    kl_input_ids, kl_attention_mask, kl_completion_mask (B, T'): each prompt with another
    row's completion (data.unpaired.mismatched_pairs), for KTO's reference point z0;
    None when collated without them. index, weight (B,); source, id: B values.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    label: Tensor
    kl_input_ids: Tensor | None = None
    kl_attention_mask: Tensor | None = None
    kl_completion_mask: Tensor | None = None
    index: Tensor | None = None
    weight: Tensor | None = None
    source: list | None = None
    id: list | None = None
    stand_in: bool = False

    def kl_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(kl_input_ids, kl_attention_mask, kl_completion_mask), (B, T') each."""
        if self.kl_input_ids is None:
            raise ValueError("this batch was collated without its KL rows")
        return self.kl_input_ids, self.kl_attention_mask, self.kl_completion_mask


@dataclass
class SFTBatch(Batch):
    """B instruction examples: input_ids, attention_mask, completion_mask (B, T), the
    completion mask True on the tokens that get loss.

    Packed (packing.pack_sequences): the rows are R packed rows (R, S) of several examples
    each, and `packed` holds their position ids and block-diagonal mask. index (B,) long;
    source, id: B values.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    index: Tensor | None = None
    source: list | None = None
    id: list | None = None
    packed: PackedInputs | None = None
    stand_in: bool = False


@dataclass
class RolloutBatch(Batch):
    """B sampled sequences (prompt + response) for PPO's update, right-padded to T.

    input_ids, attention_mask, completion_mask (B, T), the completion mask True on the
    response tokens. Per token, (B, T), from the rollout (None before it is scored):
    old_token_logps (the policy's log-probs when sampled), old_values (the critic's),
    advantages and returns (GAE).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    old_token_logps: Tensor | None = None
    old_values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    index: Tensor | None = None
    stand_in: bool = False
