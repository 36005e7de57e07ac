"""Instruction data for SFT: load, normalise, tokenize, collate.

Each row is one of (detected per row, so a file may mix them):

  prompt-completion  prompt and completion strings; loss on the completion.
  conversational     prompt messages (or a prompt string) and assistant completion messages
                     (or a whole conversation in `completion`, whose last assistant turn is
                     the completion), as KTO's unpaired rows; loss on the completion.
  messages           a whole conversation in `messages`; loss on EVERY assistant turn. This
                     is what TRL 1.16's SFTTrainer does with `assistant_only_loss=True`; with
                     completion_only_loss off (TRL's default for `messages`) every token
                     trains. A conversation with one assistant turn at the end gives the same
                     ids and mask as the same conversation split into prompt and completion.
  text               plain text (language-model data); loss on every token.

`source` and `id` columns are kept; `weight` and `margin` have no meaning here and are
ignored. Malformed rows raise DataError naming origin and field; rows with nothing to learn
(an empty completion or text, only empty assistant turns) are dropped with a count, or
refused under strict=True.

Tokenization follows data.tokenize, so a completion has the same ids in SFT, DPO and KTO:
text completions get EOS once (a `text` row too: TRL appends it to language-model rows),
a tokenizer that adds BOS gets it in front, conversations use the chat template (whose
end-of-turn is the EOS), and a token merged across the prompt/completion boundary counts as
completion. An assistant turn of a `messages` row spans from the end of the conversation
rendered up to it with the generation prompt to the end of the conversation rendered
through it, both located by the same common-prefix rule on the ids of the whole rendering.

Truncation: the prompt (for `messages`, everything before the first assistant reply; for
`text`, only BOS) keeps its last max_prompt_length tokens, then the rest keeps its first
max_length - len(prompt) tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from prefalign.batches import SFTBatch
from prefalign.data.chat import require_chat_template
from prefalign.data.collate import batch_columns, pad_sequences
from prefalign.data.formats import (
    DROP_EMPTY,
    DroppedRow,
    NormalizeReport,
    check_messages,
    is_empty,
    kept_columns,
    normalize_each,
    row_keys,
    type_name,
)
from prefalign.data.load import DataKind, load
from prefalign.data.report import DataReport
from prefalign.data.sources import Row
from prefalign.data.tokenize import (
    CompletionTruncation,
    apply_template,
    check_limits,
    common_prefix,
    render_ids,
)
from prefalign.data.unpaired import prompt_and_completion
from prefalign.errors import DataError

Ids = list[int]
FORMATS = ("prompt-completion", "conversational", "messages", "text")
_KEPT = ("source", "id")


# -- rows -> examples -----------------------------------------------------------------


def normalize_instruction_row(data: Any, origin: str) -> dict:
    """One raw row -> example: format, origin, source/id when present, and
    prompt + completion (prompt-completion, conversational), messages, or text."""
    if not isinstance(data, dict):
        raise DataError(f"{origin}: expected an object with prompt/completion, messages or "
                        f"text, got {type(data).__name__}")
    if data.get("messages") is not None:
        example = {"messages": _conversation(data["messages"], origin), "format": "messages"}
    elif data.get("completion") is not None:
        example = _prompt_completion(data, origin)
    elif data.get("text") is not None:
        if not isinstance(data["text"], str):
            raise DataError(f"{origin}: field 'text' must be a string, got "
                            f"{type_name(data['text'])}")
        example = {"text": data["text"], "format": "text"}
    else:
        hint = ""
        if "chosen" in data or "rejected" in data:
            hint = "; chosen/rejected rows are preference data, for `prefalign dpo`"
        raise DataError(f"{origin}: expected field 'messages', 'prompt' + 'completion' or "
                        f"'text' (the row has {row_keys(data)}){hint}")
    example["origin"] = origin
    example.update(kept_columns({k: data[k] for k in _KEPT if k in data}, origin))
    return example


def _conversation(messages: Any, origin: str) -> list[dict]:
    if not isinstance(messages, list):
        raise DataError(f"{origin}: field 'messages' must be a list of messages, got "
                        f"{type_name(messages)}")
    messages = check_messages(messages, "messages", origin)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{origin}: field 'messages' has no assistant turn; SFT learns the "
                        "assistant's replies")
    return messages


def _prompt_completion(data: dict, origin: str) -> dict:
    prompt, completion, conversational = prompt_and_completion(data, origin)
    return {"prompt": prompt, "completion": completion,
            "format": "conversational" if conversational else "prompt-completion"}


def _nothing_to_learn(example: dict) -> bool:
    if example["format"] == "messages":
        return is_empty([m for m in example["messages"] if m["role"] == "assistant"])
    return is_empty(example["text"] if example["format"] == "text" else example["completion"])


def normalize_instructions(rows: list[Row], strict: bool = False
                           ) -> tuple[list[dict], NormalizeReport]:
    """Rows -> examples; len(examples) + report.n_dropped == len(rows)."""
    def normalize_one(data: Any, origin: str) -> dict:
        example = normalize_instruction_row(data, origin)
        if _nothing_to_learn(example):
            raise DroppedRow(DROP_EMPTY)
        return example

    return normalize_each(rows, normalize_one, strict)


# -- examples -> features -------------------------------------------------------------


def _render_conversation(example: dict, tokenizer: Any) -> tuple[str, list[tuple[str, str]]]:
    """The whole rendering and, per assistant turn, (text before it, text through it)."""
    messages, origin = example["messages"], example["origin"]
    require_chat_template(tokenizer, origin)
    full = apply_template(tokenizer, messages, origin)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = apply_template(tokenizer, messages[:i], origin, add_generation_prompt=True)
        through = apply_template(tokenizer, messages[: i + 1], origin)
        for text, what in ((before, "with its generation prompt"), (through, "")):
            if not full.startswith(text):
                raise DataError(
                    f"{origin}: the chat template renders the conversation up to message {i} "
                    f"{what} differently from the whole conversation, so the assistant turn "
                    f"cannot be located; it ends {text[-40:]!r}")
        spans.append((before, through))
    return full, spans


def _messages_ids(examples: list[dict], tokenizer: Any) -> list[tuple[Ids, Ids, Ids]]:
    """(prompt ids, completion ids, completion mask) per `messages` example, untruncated."""
    rendered = [_render_conversation(e, tokenizer) for e in examples]
    texts = [t for full, spans in rendered for t in (full, *(x for span in spans for x in span))]
    # One batched call: the fast tokenizer encodes the whole list in Rust.
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for _, spans in rendered:
        full = list(next(ids))
        mask = [0] * len(full)
        starts = []
        for _ in spans:
            before, through = next(ids), next(ids)
            start = common_prefix(before, full)
            end = common_prefix(through, full)
            # A token that merges the turn's end with the next text still holds the reply.
            end += end < len(through)
            mask[start:end] = [1] * (end - start)
            starts.append(start)
        first = starts[0]
        out.append((full[:first], full[first:], mask[first:]))
    return out


def _pair_ids(examples: list[dict], tokenizer: Any) -> list[tuple[Ids, Ids, Ids]]:
    """(prompt ids, completion ids, all-ones mask) by data.tokenize's rules; a `text` row is
    the completion of an empty prompt (so the prompt is BOS or nothing)."""
    as_pairs = []
    for e in examples:
        prompt, completion = ("", e["text"]) if e["format"] == "text" else (e["prompt"],
                                                                           e["completion"])
        as_pairs.append({"prompt": prompt, "chosen": completion, "rejected": completion,
                         "origin": e["origin"]})
    rendered, _ = render_ids(as_pairs, tokenizer)
    return [(p, c, [1] * len(c)) for p, c, _ in rendered]


def tokenize_instructions(
    examples: list[dict],
    tokenizer: Any,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
) -> tuple[list[dict], tuple[int, int]]:
    """Examples -> features and (prompts truncated, completions truncated).

    Feature: prompt_input_ids, completion_input_ids (list[int]), completion_mask (list[int],
    aligned with completion_input_ids: 1 = trained with completion_only_loss; all ones except
    in the user/tool turns between assistant replies of a `messages` row) and the example's
    source/id.
    """
    check_limits(max_length, max_prompt_length)
    whole = [i for i, e in enumerate(examples) if e["format"] == "messages"]
    pairs = [i for i, e in enumerate(examples) if e["format"] != "messages"]
    rendered: dict[int, tuple[Ids, Ids, Ids]] = {}
    rendered.update(zip(whole, _messages_ids([examples[i] for i in whole], tokenizer)))
    rendered.update(zip(pairs, _pair_ids([examples[i] for i in pairs], tokenizer)))
    cut = CompletionTruncation(max_length, max_prompt_length, tokenizer.bos_token_id)
    features = []
    for i, example in enumerate(examples):
        prompt, completion, mask = rendered[i]
        p, c = cut(prompt, completion)
        feature = {"prompt_input_ids": p, "completion_input_ids": c,
                   "completion_mask": mask[: len(c)]}
        feature.update({k: example[k] for k in _KEPT if k in example})
        features.append(feature)
    return features, cut.counts


def _normalize(rows: list, strict: bool) -> tuple[list[dict], NormalizeReport, dict]:
    examples, norm = normalize_instructions(rows, strict=strict)
    return examples, norm, {}


def _tokenize(examples: list[dict], tokenizer: Any, max_length: int | None,
              max_prompt_length: int | None) -> tuple[list[dict], dict]:
    features, (cut_prompts, cut_completions) = tokenize_instructions(
        examples, tokenizer, max_length, max_prompt_length)
    return features, {"truncated": {"prompts": cut_prompts, "completions": cut_completions},
                      "completion_tokens": sum(loss_token_count(f, True) for f in features)}


SFT_DATA = DataKind("sft", _normalize, _tokenize, weighted=False)


def load_instructions(source: Any, tokenizer: Any, **options: Any
                      ) -> tuple[list[dict], DataReport]:
    """Instruction rows -> (features, DataReport); options and errors: data.load.load."""
    return load(SFT_DATA, source, tokenizer, **options)


# -- features -> batch ----------------------------------------------------------------


def loss_mask(feature: dict, completion_only_loss: bool = True) -> list[int]:
    """(len(prompt) + len(completion),) 1 on the tokens that get loss (before the shift)."""
    n_prompt, n_completion = len(feature["prompt_input_ids"]), len(feature["completion_input_ids"])
    if not completion_only_loss:
        return [1] * (n_prompt + n_completion)
    return [0] * n_prompt + list(feature["completion_mask"])


def loss_token_count(feature: dict, completion_only_loss: bool = True) -> int:
    """Tokens the loss averages over: the loss mask without position 0, which no prefix
    predicts (logprobs.completion_logps drops it the same way)."""
    return sum(loss_mask(feature, completion_only_loss)[1:])


def collate_instructions(features: list[dict], pad_token_id: int,
                         completion_only_loss: bool = True) -> SFTBatch:
    """B features -> SFTBatch, right padded (as TRL's DataCollatorForLanguageModeling).

    input_ids, attention_mask (B, T) long; completion_mask (B, T) bool: True on the tokens
    that get loss (loss_mask), never on padding; index, source and id when present.
    """
    if not features:
        raise ValueError("collate_instructions needs at least one feature")
    sequences = [list(f["prompt_input_ids"]) + list(f["completion_input_ids"]) for f in features]
    input_ids, attention_mask = pad_sequences(sequences, pad_token_id, "right", None)
    completion_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    for row, feature in enumerate(features):
        mask = loss_mask(feature, completion_only_loss)
        completion_mask[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return SFTBatch(input_ids, attention_mask, completion_mask, **batch_columns(features))
