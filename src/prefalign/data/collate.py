"""Pad tokenized preference features into one PreferenceBatch: chosen rows, then rejected.

Both halves go through the model in one forward pass, so prompt+chosen and prompt+rejected
are stacked into a single (2B, T) tensor padded to the longest of all 2B sequences.
"""

from __future__ import annotations

from typing import Any

import torch

from prefalign.batches import PreferenceBatch


def collate_preferences(
    features: list[dict],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> PreferenceBatch:
    """B features (data.tokenize) -> PreferenceBatch.

    input_ids       (2B, T) long: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected
    attention_mask  (2B, T) long: 1 on real tokens, 0 on padding
    completion_mask (2B, T) bool: True on completion tokens (not prompt, not padding)
    margin          (B,) float, 0.0 where a row has none   } only when some
    weight          (B,) float, 1.0 where a row has none   } feature has the
    source, id      list of B values, None where absent    } column
    index           (B,) long, the features' "index" (their row positions), when all have one

    T is the longest sequence, rounded up to pad_to_multiple_of. With padding_side="left"
    every row holds the same tokens and masks, shifted to end at column T-1.
    """
    if not features:
        raise ValueError("collate_preferences needs at least one feature")
    sequences, prompt_lengths = [], []
    for key in ("chosen_input_ids", "rejected_input_ids"):
        for f in features:
            sequences.append(list(f["prompt_input_ids"]) + list(f[key]))
            prompt_lengths.append(len(f["prompt_input_ids"]))
    input_ids, attention_mask = pad_sequences(sequences, pad_token_id, padding_side, pad_to_multiple_of)
    completion_mask = attention_mask.bool()
    for row, n_prompt in enumerate(prompt_lengths):
        start = 0 if padding_side == "right" else int((attention_mask[row] == 0).sum())
        completion_mask[row, start : start + n_prompt] = False
    return PreferenceBatch(input_ids, attention_mask, completion_mask,
                           **batch_columns(features, ("margin", "weight")))


def collate_prompts(prompt_ids_list: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompts for generation, left-padded so every prompt ends at the last column.

    input_ids (B, T) long, attention_mask (B, T) long (1 = real token).
    """
    if not prompt_ids_list:
        raise ValueError("collate_prompts needs at least one prompt")
    input_ids, attention_mask = pad_sequences([list(p) for p in prompt_ids_list], pad_token_id, "left", None)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pad_sequences(
    sequences: list[list[int]], pad_token_id: int, padding_side: str, pad_to_multiple_of: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) padded ids and (N, T) long attention mask."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: give the tokenizer a pad token")
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        cols = slice(0, len(seq)) if padding_side == "right" else slice(length - len(seq), length)
        input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


def batch_columns(features: list[dict], numbers: tuple[str, ...] = ()) -> dict[str, Any]:
    """The optional columns of a typed batch: `index` (B,) long when every feature has one;
    of `numbers` ("margin", "weight"), a (B,) float for each some feature has; `source` and
    `id` lists when some feature has them."""
    out: dict[str, Any] = {}
    if all(f.get("index") is not None for f in features):
        out["index"] = torch.tensor([int(f["index"]) for f in features], dtype=torch.long)
    # Absent values get the neutral element of each use: no margin, unit weight.
    for key, default in (("margin", 0.0), ("weight", 1.0)):
        if key in numbers and any(f.get(key) is not None for f in features):
            values = [default if f.get(key) is None else float(f[key]) for f in features]
            out[key] = torch.tensor(values, dtype=torch.float32)
    for key in ("source", "id"):
        if any(f.get(key) is not None for f in features):
            out[key] = [f.get(key) for f in features]
    return out
