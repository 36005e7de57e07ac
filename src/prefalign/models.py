"""Loading and saving models and tokenizers from local directories (or a hub cache)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from prefalign.errors import PrefalignError


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory, with a pad token guaranteed.

    A tokenizer without a pad token (GPT-2, Llama) pads with EOS: padded positions are
    masked everywhere, so the id only has to exist.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        hint = "" if Path(path).exists() else " (no such directory; the hub is not reachable offline)"
        raise PrefalignError(f"cannot load a tokenizer from {path}{hint}: "
                             f"{str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise PrefalignError(f"tokenizer of {path} has neither a pad nor an EOS token; "
                                 "add a pad token to it before training")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
