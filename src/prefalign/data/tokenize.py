"""Tokenize normalised preference examples the way TRL's DPOTrainer does, then truncate.

Rendering (token ids equal TRL 1.16's `DPOTrainer._prepare_dataset` for the same row):
  text rows            EOS is appended to chosen and rejected unless the text already ends
                       with it, so it appears once. The prompt and prompt+completion strings are
                       tokenized without special tokens; a tokenizer that adds BOS by itself
                       (Llama, Gemma) gets that one BOS in front, as TRL's plain `tokenizer(text)`
                       call gives it.
  conversational rows  prompt text = chat template of the prompt messages with the generation
                       prompt; completion text = template of prompt + completion minus that
                       prefix (a template that does not render the prompt as a prefix is an
                       error). The template's own end-of-turn is the EOS: nothing is appended.
                       Rendered text is tokenized without special tokens (the template writes
                       its own BOS), like `apply_chat_template(tokenize=True)`.
  text rows as chat    with --text-as-chat (data.chat), text rows are first turned into
                       messages and then rendered as conversational rows.
  Both                 prompt and prompt+completion are tokenized as whole strings and split
                       where the ids first differ, so a token that merges across the boundary
                       counts as completion (TRL's `common_prefix_length` rule).

Truncation (prefalign's rule; TRL truncates the joined sequence in its collator instead):
the prompt keeps its LAST max_prompt_length tokens (BOS stays in front if it was there),
then each completion keeps its FIRST max_length - len(prompt) tokens; a prompt that would
leave no room for one completion token is cut further from the left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefalign.data.chat import (
    TEMPLATE_PATH,
    example_as_chat,
    require_chat_template,
    text_as_chat,
)
from prefalign.data.formats import KEPT_COLUMNS
from prefalign.errors import ConfigError, DataError

Ids = list[int]


@dataclass
class TruncationReport:
    """How many rows had each part truncated, and how many had a merged boundary token."""

    rows: int = 0
    prompt: int = 0
    chosen: int = 0
    rejected: int = 0
    boundary_merged: int = 0  # rows whose last prompt token merged into the completion

    @property
    def any(self) -> bool:
        return bool(self.prompt or self.chosen or self.rejected)


def tokenize_preferences(
    examples: list[dict],
    tokenizer: Any,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
) -> tuple[list[dict], TruncationReport]:
    """Examples (see data.formats) -> features and a truncation report.

    Each feature: prompt_input_ids, chosen_input_ids, rejected_input_ids (list[int]; each
    completion ends with EOS unless truncated) plus the example's kept columns (margin,
    weight, source, id). None for a limit means no limit.
    """
    check_limits(max_length, max_prompt_length)
    rendered, merged = render_ids(examples, tokenizer, max_length, max_prompt_length)
    truncated, report = truncate_all(
        rendered, max_length, max_prompt_length, tokenizer.bos_token_id
    )
    report.boundary_merged = merged
    features = []
    for example, (prompt, chosen, rejected) in zip(examples, truncated):
        feature = {
            "prompt_input_ids": prompt,
            "chosen_input_ids": chosen,
            "rejected_input_ids": rejected,
        }
        feature.update({k: example[k] for k in KEPT_COLUMNS if k in example})
        features.append(feature)
    return features, report


def truncate_all(
    rendered: list[tuple[Ids, Ids, Ids]],
    max_length: int | None,
    max_prompt_length: int | None,
    keep_first: int | None = None,
) -> tuple[list[tuple[Ids, Ids, Ids]], TruncationReport]:
    """truncate_ids on every (prompt, chosen, rejected) triple, counting what was cut."""
    report = TruncationReport(rows=len(rendered))
    out = []
    for prompt, chosen, rejected in rendered:
        p, c, r = truncate_ids(prompt, chosen, rejected, max_length, max_prompt_length, keep_first)
        report.prompt += len(p) < len(prompt)
        report.chosen += len(c) < len(chosen)
        report.rejected += len(r) < len(rejected)
        out.append((p, c, r))
    return out, report


def check_limits(max_length: int | None, max_prompt_length: int | None) -> None:
    """ConfigError unless max_length >= 2 and max_prompt_length >= 1 (None = no limit)."""
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
    ):
        raise ConfigError(
            f"max_length must be an integer >= 2 (a prompt and a completion token), got {max_length!r}"
        )
    if max_prompt_length is not None and (
        isinstance(max_prompt_length, bool)
        or not isinstance(max_prompt_length, int)
        or max_prompt_length < 1
    ):
        raise ConfigError(f"max_prompt_length must be an integer >= 1, got {max_prompt_length!r}")


def truncate_ids(
    prompt: Ids,
    chosen: Ids,
    rejected: Ids,
    max_length: int | None,
    max_prompt_length: int | None,
    keep_first: int | None = None,
) -> tuple[Ids, Ids, Ids]:
    """Prompt cut from the left, completions from the right; len(p) + len(c) <= max_length.

    keep_first: a token id (BOS) that stays at position 0 when the prompt is cut, because
    the model has always seen it there.
    """
    if max_prompt_length is not None:
        prompt = _keep_last(prompt, max_prompt_length, keep_first)
    if max_length is not None:
        prompt = _keep_last(prompt, max_length - 1, keep_first)  # room for >= 1 completion token
        room = max_length - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected



class CompletionTruncation:
    """Truncates (prompt, completion) examples by truncate_ids' rule (the completion on
    both sides) and counts how many prompts and completions it cut."""

    def __init__(self, max_length: int | None, max_prompt_length: int | None,
                 keep_first: int | None) -> None:
        self.limits = (max_length, max_prompt_length, keep_first)
        self.prompts = self.completions = 0

    def __call__(self, prompt: Ids, completion: Ids) -> tuple[Ids, Ids]:
        p, c, _ = truncate_ids(prompt, completion, completion, *self.limits)
        self.prompts += len(p) < len(prompt)
        self.completions += len(c) < len(completion)
        return p, c

    @property
    def counts(self) -> tuple[int, int]:
        return self.prompts, self.completions

def _keep_last(ids: Ids, n: int, keep_first: int | None) -> Ids:
    if len(ids) <= n:
        return ids
    if keep_first is not None and ids[0] == keep_first and n >= 2:
        return ids[:1] + ids[len(ids) - (n - 1) :]
    return ids[len(ids) - n :]


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True when `tokenizer(text)` puts BOS in front by itself (its post-processor does)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def render_ids(
    examples: list[dict],
    tokenizer: Any,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> tuple[list[tuple[Ids, Ids, Ids]], int]:
    """Untruncated (prompt, chosen, rejected) ids per example and the count of merged boundaries.

    max_length, max_prompt_length: the limits truncate_ids applies next. Given, a text far
    longer than they keep is cut before tokenizing (see CUT_CHARS_PER_TOKEN): truncation
    then keeps the same ids, and only the ids it drops are fewer.
    """
    bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    texts, prefixes = [], []
    as_chat = text_as_chat(tokenizer)
    for example in examples:
        if as_chat:
            example = example_as_chat(example, tokenizer)
        if isinstance(example["prompt"], list):
            texts.append(_render_conversation(example, tokenizer))
            prefixes.append([])
        else:
            texts.append(_render_text(example, tokenizer))
            prefixes.append(bos)
    limits = _token_limits(max_length, max_prompt_length)
    cuts = [_cut_texts(t, limits, tokenizer.bos_token) for t in texts]
    rendered = _tokenize_split([c for c, _ in cuts], prefixes, tokenizer)
    short = [
        i for i, (_, flags) in enumerate(cuts) if not _long_enough(rendered[i][0], flags, limits)
    ]
    again = _tokenize_split([texts[i] for i in short], [prefixes[i] for i in short], tokenizer)
    for i, row in zip(short, again):
        rendered[i] = row
    return [ids for ids, _ in rendered], sum(merged for _, merged in rendered)


# A row far longer than max_length is tokenized only for truncation to drop nearly all of
# it, and one 10 MB line takes minutes. So each part is first cut to this many characters
# per token it can keep (the prompt from the left, completions from the right), and a cut
# stands only if the part still has twice the tokens it can keep: the kept tokens then lie
# far from the cut, which changes only the tokens next to it. A part that falls short (over
# 32 characters per token) is tokenized again whole.
CUT_CHARS_PER_TOKEN = 64


def _token_limits(max_length: int | None, max_prompt_length: int | None
                  ) -> tuple[int | None, int | None]:
    """(most prompt tokens, most completion tokens) truncate_ids keeps; None = no limit."""
    room = None if max_length is None else max_length - 1  # one completion token at least
    prompt = [n for n in (max_prompt_length, room) if n is not None]
    return (min(prompt) if prompt else None), max_length


def _cut_texts(texts: tuple[str, str, str], limits: tuple, bos_text: str | None) -> tuple:
    """((prompt, prompt + chosen, prompt + rejected) cut to the character budget, which
    parts were cut); a leading BOS stays, as truncate_ids keeps it."""
    prompt, *fulls = texts
    completions = [full[len(prompt) :] for full in fulls]
    prompt_limit, completion_limit = limits
    flags = [False, False, False]
    if prompt_limit is not None and len(prompt) > prompt_limit * CUT_CHARS_PER_TOKEN:
        keep = bos_text if bos_text and prompt.startswith(bos_text) else ""
        prompt = keep + prompt[len(prompt) - prompt_limit * CUT_CHARS_PER_TOKEN :]
        flags[0] = True
    if completion_limit is not None:
        budget = completion_limit * CUT_CHARS_PER_TOKEN
        for i, completion in enumerate(completions):
            if len(completion) > budget:
                completions[i], flags[i + 1] = completion[:budget], True
    if not any(flags):
        return texts, flags
    return (prompt, prompt + completions[0], prompt + completions[1]), flags


def _long_enough(ids: tuple[Ids, Ids, Ids], flags: list[bool], limits: tuple) -> bool:
    prompt_limit, completion_limit = limits
    need = (prompt_limit, completion_limit, completion_limit)
    return all(not cut or len(part) >= 2 * n for part, cut, n in zip(ids, flags, need))


def _tokenize_split(
    texts: list[tuple[str, str, str]], prefixes: list[Ids], tokenizer: Any
) -> list[tuple[tuple[Ids, Ids, Ids], bool]]:
    """((prompt, chosen, rejected) ids, boundary merged?) per row of rendered texts."""
    flat = [text for triple in texts for text in triple]
    # One batched call: the fast tokenizer encodes the whole list in Rust.
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out = []
    for i, prefix in enumerate(prefixes):
        prompt, with_chosen, with_rejected = (prefix + list(x) for x in ids[3 * i : 3 * i + 3])
        n = min(common_prefix(prompt, with_chosen), common_prefix(prompt, with_rejected))
        out.append(((prompt[:n], with_chosen[n:], with_rejected[n:]), n < len(prompt)))
    return out


def common_prefix(a: Ids, b: Ids) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render_text(example: dict, tokenizer: Any) -> tuple[str, str, str]:
    eos = tokenizer.eos_token
    if not eos:
        raise DataError(
            f"{example['origin']}: the tokenizer has no eos_token, so completions cannot be "
            "terminated; set tokenizer.eos_token"
        )
    prompt = example["prompt"]
    completions = [
        c if c.endswith(eos) else c + eos for c in (example["chosen"], example["rejected"])
    ]
    return prompt, prompt + completions[0], prompt + completions[1]


def _render_conversation(example: dict, tokenizer: Any) -> tuple[str, str, str]:
    origin = example["origin"]
    require_chat_template(tokenizer, origin)
    prompt = apply_template(tokenizer, example["prompt"], origin, add_generation_prompt=True)
    full = []
    for key in ("chosen", "rejected"):
        text = apply_template(tokenizer, example["prompt"] + example[key], origin)
        if not text.startswith(prompt):
            raise DataError(
                f"{origin}: the chat template renders the prompt (with its generation prompt) "
                f"differently inside prompt + {key}, so the completion cannot be separated; "
                f"prompt ends {prompt[-40:]!r}, the conversation has "
                f"{text[max(0, len(prompt) - 40) : len(prompt)]!r}"
            )
        full.append(text)
    return prompt, full[0], full[1]


def apply_template(tokenizer: Any, messages: list[dict], origin: str, **kwargs: Any) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate")
        path = getattr(tokenizer, TEMPLATE_PATH, None)
        which = f"the chat template ({path})" if path else "the chat template"
        raise DataError(f"{origin}: {which} failed on this row: {e}") from None
