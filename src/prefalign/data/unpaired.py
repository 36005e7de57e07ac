"""Unpaired (thumbs-up / thumbs-down) data for KTO: load, unpair, tokenize, collate.

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv:2402.01306) learns from single completions labelled desirable or not. A file holds
one of two kinds of rows, decided by its first row:

  unpaired  prompt, completion, label (true/false; 1/0 and "true"/"false" text from CSV
            are accepted), optional weight, source, id. Text rows have string prompt and
            completion; conversational rows have prompt messages (or a prompt string) and
            assistant completion messages, or a whole conversation in `completion` whose
            last assistant turn is the completion (as data.formats does for chosen/rejected).
  paired    any preference format data.formats normalises; each pair becomes
            (prompt, chosen, True) and (prompt, rejected, False), as TRL's
            `unpair_preference_dataset` does, keeping the pair's weight, source and id.

Tokenization follows data.tokenize exactly (text completions get EOS once, conversational
ones use the chat template; prompt cut from the left, completion from the right), so a
completion has the same ids whether it trains DPO or KTO.

The KL batch: KTO's reference point z0 is estimated from mismatched (prompt, completion)
pairs. As in TRL 1.16's KTOTrainer, row i of a batch is paired with the completion of row
i - 1 (row 0 with the last row's), so the mismatched completions are the batch's own.
"""

from __future__ import annotations

from typing import Any

import torch

from prefalign.batches import UnpairedBatch
from prefalign.data.collate import batch_columns, pad_sequences
from prefalign.data.formats import (
    DROP_EMPTY,
    DroppedRow,
    NormalizeReport,
    check_messages,
    check_text_or_messages,
    is_empty,
    kept_columns,
    last_assistant_turn,
    normalize_each,
    normalize_rows,
    row_keys,
    type_name,
)
from prefalign.data.load import DataKind, load
from prefalign.data.report import DataReport
from prefalign.data.sources import Row
from prefalign.data.tokenize import CompletionTruncation, check_limits, render_ids
from prefalign.errors import DataError

Ids = list[int]
UNPAIRED_KEYS = ("completion", "label")
PAIRED_KEYS = ("chosen", "rejected")
_TRUE, _FALSE = ("true", "1"), ("false", "0")


# -- rows -> examples -----------------------------------------------------------------


def detect_kind(rows: list[Row]) -> str:
    """'paired' when the first row has chosen/rejected and no completion, else 'unpaired'."""
    data = rows[0].data
    if isinstance(data, dict) and "completion" not in data and any(k in data for k in PAIRED_KEYS):
        return "paired"
    return "unpaired"


def coerce_label(value: Any, origin: str) -> bool:
    """True/False from a bool, 1/0 (int or float) or 'true'/'false'/'1'/'0' text (CSV)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    shown = type_name(value) if value is None else repr(value)
    raise DataError(f"{origin}: field 'label' must be true or false (or 1/0), got {shown:.60}")


def normalize_unpaired(rows: list[Row], strict: bool = False
                       ) -> tuple[list[dict], NormalizeReport, str]:
    """Rows of either kind -> unpaired examples, the row report and the kind.

    Each example: prompt, completion (strings, or message lists when conversational),
    label (bool), format, origin, and the row's weight/source/id when present.
    """
    kind = detect_kind(rows)
    if kind == "paired":
        _refuse_mixed(rows, "completion", "unpaired (prompt/completion/label)")
        pairs, report = normalize_rows(rows, strict=strict)
        return [ex for pair in pairs for ex in unpair(pair)], report, kind
    _refuse_mixed(rows, "chosen", "paired (chosen/rejected)")

    def normalize_one(data: Any, origin: str) -> dict:
        example = normalize_unpaired_row(data, origin)
        if is_empty(example["completion"]):
            raise DroppedRow(DROP_EMPTY)
        return example

    examples, report = normalize_each(rows, normalize_one, strict)
    return examples, report, kind


def _refuse_mixed(rows: list[Row], key: str, other: str) -> None:
    first = rows[0].origin
    for data, origin in rows:
        if isinstance(data, dict) and data.get(key) is not None:
            kind = "paired" if key == "completion" else "unpaired"
            raise DataError(
                f"{origin}: field {key!r} marks a row as {other}, but the first row ({first}) made "
                f"this a {kind} file; give one kind of row per file"
            )


def unpair(pair: dict) -> list[dict]:
    """One normalised preference pair -> its desirable and its undesirable example."""
    kept = {k: v for k, v in pair.items() if k in ("weight", "source", "id")}
    return [
        {"prompt": pair["prompt"], "completion": pair[key], "label": label,
         "format": pair["format"], "origin": pair["origin"], **kept}
        for key, label in (("chosen", True), ("rejected", False))
    ]


def normalize_unpaired_row(data: Any, origin: str) -> dict:
    """One raw unpaired row -> example (see normalize_unpaired); DataError names the field."""
    if not isinstance(data, dict):
        raise DataError(
            f"{origin}: expected an object with prompt/completion/label, got {type(data).__name__}"
        )
    for key in UNPAIRED_KEYS:
        if data.get(key) is None:
            raise DataError(f"{origin}: missing field {key!r} (the row has {row_keys(data)})")
    label = coerce_label(data["label"], origin)
    prompt, completion, conversational = prompt_and_completion(data, origin)
    example = {"prompt": prompt, "completion": completion, "label": label,
               "format": "conversational" if conversational else "text", "origin": origin}
    kept = kept_columns(data, origin)
    kept.pop("margin", None)  # a pair's margin has no meaning for a single completion
    example.update(kept)
    return example


def prompt_and_completion(data: dict, origin: str) -> tuple[Any, Any, bool]:
    """(prompt, completion, conversational) of a row with `completion` and maybe `prompt`:
    two strings, or prompt and completion messages (split_conversation) when either is a
    conversation. SFT and unpaired rows share this rule."""
    completion, prompt = data["completion"], data.get("prompt")
    check_text_or_messages(completion, "completion", origin)
    if prompt is not None:
        check_text_or_messages(prompt, "prompt", origin)
    if isinstance(completion, str) and not isinstance(prompt, list):
        if prompt is None:
            raise DataError(f"{origin}: missing field 'prompt' (the row has {row_keys(data)})")
        return prompt, completion, False
    return *split_conversation(prompt, completion, origin), True


def split_conversation(prompt: Any, completion: Any, origin: str) -> tuple[list, list]:
    """(prompt messages, completion messages) from a prompt + reply or a whole conversation."""
    if isinstance(completion, list):
        completion = check_messages(completion, "completion", origin)
        if any(m["role"] != "assistant" for m in completion):
            # A whole conversation carries its own prompt; a prompt column beside it is
            # ignored, as data.formats does for chosen/rejected conversations.
            return last_assistant_turn(completion, "completion", origin)
    else:
        completion = [{"role": "assistant", "content": completion}]
    if prompt is None:
        raise DataError(
            f"{origin}: field 'completion' holds only assistant turns and the row has no "
            "'prompt'; add a prompt or give the whole conversation"
        )
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], completion
    prompt = check_messages(prompt, "prompt", origin)
    if prompt[-1]["role"] == "assistant":
        raise DataError(
            f"{origin}: field 'prompt' ends with an assistant turn; it must end with the "
            "user (or system/tool) turn the completion answers"
        )
    return prompt, completion


# -- examples -> features -------------------------------------------------------------


def tokenize_unpaired(
    examples: list[dict],
    tokenizer: Any,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
) -> tuple[list[dict], tuple[int, int]]:
    """Examples -> features and (prompts truncated, completions truncated).

    Feature: prompt_input_ids, completion_input_ids (list[int]), label (bool) and the
    example's weight/source/id. The ids are data.tokenize's for the pair (prompt,
    completion, completion): the same rendering, boundary rule and truncation as DPO.
    """
    check_limits(max_length, max_prompt_length)
    as_pairs = [{"prompt": e["prompt"], "chosen": e["completion"], "rejected": e["completion"],
                 "origin": e["origin"]} for e in examples]
    rendered, _ = render_ids(as_pairs, tokenizer, max_length, max_prompt_length)
    cut = CompletionTruncation(max_length, max_prompt_length, tokenizer.bos_token_id)
    features = []
    for example, (prompt, completion, _) in zip(examples, rendered):
        p, c = cut(prompt, completion)
        feature = {"prompt_input_ids": p, "completion_input_ids": c, "label": example["label"]}
        feature.update({k: example[k] for k in ("weight", "source", "id") if k in example})
        features.append(feature)
    return features, cut.counts


def _normalize(rows: list, strict: bool) -> tuple[list[dict], NormalizeReport, dict]:
    examples, norm, kind = normalize_unpaired(rows, strict=strict)
    return examples, norm, {"kind": kind}


def _tokenize(examples: list[dict], tokenizer: Any, max_length: int | None,
              max_prompt_length: int | None) -> tuple[list[dict], dict]:
    features, (cut_prompts, cut_completions) = tokenize_unpaired(
        examples, tokenizer, max_length, max_prompt_length)
    desirable = sum(f["label"] for f in features)
    return features, {"desirable": desirable, "undesirable": len(features) - desirable,
                      "truncated": {"prompts": cut_prompts, "completions": cut_completions}}


UNPAIRED_DATA = DataKind("unpaired", _normalize, _tokenize, weighted=True)


def load_unpaired(source: Any, tokenizer: Any, **options: Any) -> tuple[list[dict], DataReport]:
    """Unpaired rows (paired ones are split in two) -> (features, DataReport); options and
    errors: data.load.load."""
    return load(UNPAIRED_DATA, source, tokenizer, **options)


# -- features -> batch ----------------------------------------------------------------


def mismatched_pairs(features: list[dict], max_length: int | None = None) -> list[tuple[Ids, Ids]]:
    """(prompt ids of row i, completion ids of row i - 1) for every row; row 0 takes the last.

    TRL 1.16 rotates the completions of each batch by one the same way. A completion longer
    than the room its new prompt leaves (max_length - len(prompt)) is cut from the right,
    prefalign's truncation rule. One row pairs with itself: there is no other completion.
    """
    completions = [f["completion_input_ids"] for f in features]
    shifted = completions[-1:] + completions[:-1]
    pairs = []
    for feature, completion in zip(features, shifted):
        prompt = list(feature["prompt_input_ids"])
        room = len(completion) if max_length is None else max(max_length - len(prompt), 0)
        pairs.append((prompt, list(completion[:room])))
    return pairs


def _sequences(pairs: list[tuple[Ids, Ids]], pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """(prompt, completion) id pairs -> right-padded ids, attention mask, completion mask."""
    input_ids, attention_mask = pad_sequences([p + c for p, c in pairs], pad_token_id, "right", None)
    completion_mask = attention_mask.bool()
    for row, (prompt, _) in enumerate(pairs):
        completion_mask[row, : len(prompt)] = False
    return input_ids, attention_mask, completion_mask


def collate_unpaired(features: list[dict], pad_token_id: int, max_length: int | None = None,
                     kl: bool = True) -> UnpairedBatch:
    """B features -> UnpairedBatch (right padding, like TRL's DataCollatorForUnpairedPreference).

    input_ids, attention_mask (B, T) long; completion_mask (B, T) bool; label (B,) bool;
    kl_input_ids, kl_attention_mask (B, T') long, kl_completion_mask (B, T') bool: the
    mismatched pairs of `mismatched_pairs` (when kl); index (B,) long, weight (B,) float,
    source and id lists when some feature has them (data.collate's rules).
    """
    if not features:
        raise ValueError("collate_unpaired needs at least one feature")
    matched = [(list(f["prompt_input_ids"]), list(f["completion_input_ids"])) for f in features]
    input_ids, attention_mask, completion_mask = _sequences(matched, pad_token_id)
    labels = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)
    kl_rows = (None, None, None)
    if kl:
        kl_rows = _sequences(mismatched_pairs(features, max_length), pad_token_id)
    return UnpairedBatch(input_ids, attention_mask, completion_mask, labels, *kl_rows,
                         **batch_columns(features, ("weight",)))


def weight_balance_note(desirable: int, undesirable: int, desirable_weight: float,
                        undesirable_weight: float) -> str | None:
    """A hint when the label balance is outside KTO's recommended range, else None.

    Ethayarajh et al. 2024, Eq. 8: (desirable_weight * n_D) / (undesirable_weight * n_U)
    should lie in [1, 4/3]. TRL 1.16 logs the same advice.
    """
    if not desirable or not undesirable:
        return None
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return None
    low = undesirable_weight * undesirable / desirable
    return (f"{desirable} desirable and {undesirable} undesirable examples give "
            f"desirable_weight * n_D / (undesirable_weight * n_U) = {ratio:.3g}; KTO recommends "
            f"[1, 4/3] (arXiv:2402.01306, Eq. 8), e.g. desirable_weight in "
            f"[{low:.3g}, {low * 4 / 3:.3g}]")

