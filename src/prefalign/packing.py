"""Batches the model reads in another layout than the one scored: packed rows, shared prompts.

Two layouts save compute against the padded (rows, T) batch, with the same numbers:

- Packing (SFT): several sequences share one row. Position ids restart at 0 for each
  sequence and a block-diagonal causal mask keeps sequences from attending to each other,
  so every token sees exactly what it would see alone in a padded row, while rows hold
  little padding.
- Prefix sharing (DPO, reward models; Wang & Hegde 2024, arXiv:2404.09340): [prompt | chosen | rejected]
  in one row. Rejected tokens may not attend to chosen tokens and their position ids
  continue from the prompt's end (prompt_len + i, as in their own sequence), so the
  prompt is computed once instead of twice.

Both are a causal LM forward with explicit position ids and a (R, 1, S, S) boolean mask
(True = may attend), which Hugging Face models take as `attention_mask` as-is. The scored
batch (input_ids, completion_mask, ...) keeps the layout the losses expect; `source` tells
which model position predicts each scored token when the two layouts differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Attention implementations that apply a custom 4D mask exactly: sdpa takes the boolean
# mask, eager an additive one. FlashAttention and flex build their own masks from 2D input.
MASK_IMPLEMENTATIONS = ("sdpa", "eager")
PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_attention_mask", "packed_source")


@dataclass
class PackedInputs:
    """What the model reads when it is not the scored batch row for row.

    input_ids (R, S) long; position_ids (R, S) long; attention_mask (R, 1, S, S) bool,
    True = the query (dim 2) may attend to the key (dim 3).
    source (B, T) long or None: flat index into the R * S model positions of the hidden
    state that predicts scored token (b, t); None = the scored batch is this layout itself
    (token t predicted from position t - 1 of the same row). Models that read one
    position per sequence (share_prefix_positions) get a (2B,) source instead.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    source: Tensor | None = None

    @classmethod
    def from_keys(cls, keys: dict[str, Tensor]) -> PackedInputs:
        """From the flat packed_* tensors that pack_sequences and share_prefix return."""
        return cls(keys["packed_input_ids"], keys["packed_position_ids"],
                   keys["packed_attention_mask"], keys.get("packed_source"))

    def to(self, device: torch.device | str) -> PackedInputs:
        return PackedInputs(self.input_ids.to(device), self.position_ids.to(device),
                            self.attention_mask.to(device),
                            None if self.source is None else self.source.to(device))


def fallback_note(model: torch.nn.Module, flag: str) -> str | None:
    """A one-line warning when `model` cannot run `flag` exactly (the plain padded path is
    used instead), or None when it can."""
    problem = custom_mask_problem(model)
    return None if problem is None else f"warning: {flag} is off for this model: {problem}"


def packed_keys(packed: PackedInputs) -> dict[str, Tensor]:
    """The flat packed_* tensors of `packed` (PackedInputs.from_keys reads them back)."""
    out = {"packed_input_ids": packed.input_ids, "packed_position_ids": packed.position_ids,
           "packed_attention_mask": packed.attention_mask}
    if packed.source is not None:
        out["packed_source"] = packed.source
    return out


def custom_mask_problem(model: torch.nn.Module) -> str | None:
    """Why `model` cannot take a custom 4D mask exactly, or None when it can."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no Hugging Face config"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    if impl not in MASK_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} ignores custom 4D masks (needs sdpa or eager)"
    # A custom mask replaces the per-layer masks, so sliding-window layers would see too much.
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return "the model has sliding-window or other non-full attention layers"
    if getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None):
        return "the model uses sliding-window attention"
    return None


def attention_bias(model: torch.nn.Module, mask: Tensor) -> Tensor:
    """The (R, 1, S, S) boolean mask in the form the model's attention takes: boolean for
    sdpa, additive (0 or the dtype's minimum) for eager, which adds it to the scores."""
    problem = custom_mask_problem(model)
    if problem is not None:
        raise ValueError(f"packed or prefix-shared batches need a custom attention mask: {problem}")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    impl = getattr(text, "_attn_implementation", None) or model.config._attn_implementation
    if impl == "sdpa":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    # The dtype's minimum, not -inf: a fully masked row would give NaN in softmax.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min)


def _segment_mask(segments: Tensor) -> Tensor:
    """(R, S) segment ids -> (R, 1, S, S) causal mask within equal ids."""
    size = segments.shape[1]
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


# -- packing: several sequences per row -------------------------------------------------


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit packing of sequences (by index, in the given order) into rows of at most
    `capacity` tokens; a sequence longer than capacity gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def pack_sequences(
    sequences: list[list[int]], loss_masks: list[list[int]], pad_token_id: int, capacity: int
) -> dict[str, Any]:
    """Sequences and their loss masks (1 = scored) packed into rows -> batch dict.

    input_ids, attention_mask (R, S) long; completion_mask (R, S) bool, never True on a
    sequence's first token (nothing before it in its own sequence predicts it), nor on
    padding; packed_* keys (see PackedInputs, source None). S is the fullest row.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: give the tokenizer a pad token")
    rows = pack_rows([len(s) for s in sequences], capacity)
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    completion_mask = torch.zeros(shape, dtype=torch.bool)
    position_ids = torch.zeros(shape, dtype=torch.long)
    # Padding is one more segment per row (id -1): causal among itself, so no query row is
    # fully masked, and no real token can see it.
    segments = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(sequences[i])
            cols = slice(start, start + n)
            input_ids[r, cols] = torch.tensor(sequences[i], dtype=torch.long)
            attention_mask[r, cols] = 1
            completion_mask[r, cols] = torch.tensor(loss_masks[i], dtype=torch.bool)
            completion_mask[r, start] = False
            position_ids[r, cols] = torch.arange(n)
            segments[r, cols] = i
            start += n
    packed = PackedInputs(input_ids, position_ids, _segment_mask(segments))
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask, **packed_keys(packed)}


# -- prefix sharing: [prompt | chosen | rejected] ----------------------------------------


def share_prefix(features: list[dict], pad_token_id: int, scored_width: int) -> dict[str, Tensor]:
    """packed_* keys running each pair as one row [prompt | chosen | rejected].

    The scored batch is data.collate_preferences' right-padded (2B, scored_width) layout:
    row b = prompt + chosen of pair b, row B + b = prompt + rejected. `packed_source` maps
    each of its positions to the model position that predicts it.
    """
    n = len(features)
    parts = [(list(f["prompt_input_ids"]), list(f["chosen_input_ids"]), list(f["rejected_input_ids"]))
             for f in features]
    width = max(len(p) + len(c) + len(r) for p, c, r in parts)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, 1, width, width), dtype=torch.bool)
    source = torch.zeros((2 * n, scored_width), dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    cols = torch.arange(scored_width)
    for b, (p, c, r) in enumerate(parts):
        P, C, R = len(p), len(c), len(r)
        input_ids[b, : P + C + R] = torch.tensor(p + c + r, dtype=torch.long)
        position_ids[b, : P + C] = torch.arange(P + C)
        position_ids[b, P + C : P + C + R] = torch.arange(P, P + R)
        mask[b, 0] = causal
        mask[b, 0, P + C : P + C + R, P : P + C] = False  # rejected never sees chosen
        # Scored token t is predicted from position t - 1 of its own sequence.
        before = (cols - 1).clamp(min=0)
        source[b] = b * width + before.clamp(max=width - 1)
        skip_chosen = torch.where(before < P, before, before + C)
        source[n + b] = b * width + skip_chosen.clamp(max=width - 1)
    return packed_keys(PackedInputs(input_ids, position_ids, mask, source))


def share_prefix_positions(features: list[dict], pad_token_id: int, positions: Tensor
                           ) -> dict[str, Tensor]:
    """packed_* keys of share_prefix's rows for models that read one position per sequence
    (a reward model's last token) instead of scoring tokens.

    positions (2B,) long: the position read in each sequence, counted from its first token;
    rows 0..B-1 are prompt+chosen and B..2B-1 prompt+rejected, as in collate_preferences.
    packed_source (2B,): the flat index of the same token among the B * S shared positions.
    """
    # scored_width=1: share_prefix's per-token source is not needed; it is replaced below.
    shared = share_prefix(features, pad_token_id, scored_width=1)
    n, width = shared["packed_input_ids"].shape
    prompt = torch.tensor([len(f["prompt_input_ids"]) for f in features]).repeat(2)
    chosen = torch.tensor([len(f["chosen_input_ids"]) for f in features]).repeat(2)
    rejected = torch.arange(2 * n) >= n
    # A rejected token past the prompt sits after the chosen tokens in the shared row; a
    # prompt token (e.g. the last real token when the completion is all padding ids) does not.
    skip = torch.where(rejected & (positions >= prompt), chosen, 0)
    shared["packed_source"] = torch.arange(n).repeat(2) * width + positions + skip
    return shared
