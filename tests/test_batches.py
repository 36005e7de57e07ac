"""Typed batches: .to() moves every tensor, the collators build them, the mapping view."""

import dataclasses

import pytest
import torch

from prefalign.batches import PreferenceBatch, RolloutBatch, SFTBatch, UnpairedBatch
from prefalign.data.collate import collate_preferences
from prefalign.data.instructions import collate_instructions
from prefalign.data.unpaired import collate_unpaired
from prefalign.packing import PackedInputs, share_prefix

PAIRS = [
    {"prompt_input_ids": [5, 6], "chosen_input_ids": [7], "rejected_input_ids": [8, 9],
     "index": 3, "weight": 2.0, "source": "a"},
    {"prompt_input_ids": [5], "chosen_input_ids": [7, 7], "rejected_input_ids": [9],
     "index": 0, "source": "b"},
]


def tensors(value):
    """Every tensor in a batch, PackedInputs' fields included."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, PackedInputs) or dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in tensors(getattr(value, f.name))]
    return []


def test_to_moves_every_tensor_and_keeps_the_rest():
    """The meta device stands for an accelerator: every tensor moves, PackedInputs' too,
    lists and flags stay as they are, and the original batch is not changed."""
    batch = collate_preferences(PAIRS, 0)
    batch.packed = PackedInputs.from_keys(share_prefix(PAIRS, 0, batch.input_ids.shape[1]))
    batch = dataclasses.replace(batch, stand_in=True)
    moved = batch.to("meta")
    assert len(tensors(moved)) == 9  # ids, 2 masks, index, weight, 4 packed
    assert all(t.device.type == "meta" for t in tensors(moved))
    assert all(t.device.type == "cpu" for t in tensors(batch))
    assert moved.source == ["a", "b"] and moved.stand_in
    unpaired = collate_unpaired([{"prompt_input_ids": [1], "completion_input_ids": [2],
                                  "label": True, "index": 0},
                                 {"prompt_input_ids": [3], "completion_input_ids": [4, 5],
                                  "label": False, "index": 1}], 0).to("meta")
    rollout = RolloutBatch(*(torch.ones(2, 3),) * 3, old_token_logps=torch.zeros(2, 3),
                           returns=torch.zeros(2, 3)).to("meta")
    for moved in (unpaired, rollout):
        assert tensors(moved) and all(t.device.type == "meta" for t in tensors(moved))


def test_collators_return_typed_batches_with_index_and_columns():
    batch = collate_preferences(PAIRS, 0)
    assert isinstance(batch, PreferenceBatch) and batch.pairs == 2
    assert batch.index.tolist() == [3, 0] and batch.index.dtype == torch.long
    assert batch.weight.tolist() == [2.0, 1.0] and batch.margin is None
    assert batch.packed_kwargs() == {}
    no_index = collate_preferences([{k: v for k, v in f.items() if k != "index"} for f in PAIRS], 0)
    assert no_index.index is None
    sft = collate_instructions([{"prompt_input_ids": [1], "completion_input_ids": [2, 3],
                                 "completion_mask": [1, 1], "index": 4}], 0)
    assert isinstance(sft, SFTBatch) and sft.index.tolist() == [4]
    kto = collate_unpaired([{"prompt_input_ids": [1], "completion_input_ids": [2],
                             "label": True}] * 2, 0, kl=False)
    assert isinstance(kto, UnpairedBatch) and kto.kl_input_ids is None
    with pytest.raises(ValueError, match="KL rows"):
        kto.kl_inputs()


def test_mapping_view_names_present_fields_and_flat_packed_keys():
    batch = collate_preferences(PAIRS, 0)
    assert "margin" not in batch and "stand_in" not in batch
    assert batch["input_ids"] is batch.input_ids
    batch.packed = PackedInputs.from_keys(share_prefix(PAIRS, 0, batch.input_ids.shape[1]))
    assert {"packed_input_ids", "packed_source"} <= set(batch.keys())
    assert batch["packed_source"] is batch.packed.source
    assert batch.packed_kwargs() == {"packed": batch.packed}
