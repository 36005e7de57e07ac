"""Tiny tokenizers and randomly initialised models of real architectures, built locally.

Tests, benchmarks and the demo need a tokenizer and a causal LM without any hub download.
`build_tokenizer` trains a byte-level BPE on a small corpus in well under a second and
gives it a chat template; `build_model` makes a Llama-, Qwen2- or GPT-2-style model of
any size from a transformers config, so the code under test is the real model code.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# Roles are marked with their own special tokens and every turn ends with EOS, so the
# completion of an assistant turn always ends with exactly one EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

_DEFAULT_CORPUS = [
    "The film was a delight from start to finish, with warm performances and a clever script.",
    "I found the plot slow and the acting wooden; the ending made no sense at all.",
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Please write a short poem about the sea. The sea is wide and blue and deep.",
    "A helpful answer is clear, correct and kind. A harmful answer is rude or wrong.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "prefalign", "numbers": [1, 2, 3], "ok": true}',
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in text too.",
    "Good great excellent wonderful superb lovely brilliant amazing fantastic enjoyable.",
    "Bad terrible awful boring dull poor weak dreadful horrible disappointing.",
]


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512, kind: str = "bpe"
) -> PreTrainedTokenizerFast:
    """Train a tokenizer locally and wrap it for transformers.

    kind="bpe": byte-level BPE, so every string is encodable (like GPT-2/Llama-3).
    kind="word": one token per word or punctuation mark of the corpus (others are <unk>);
    a tiny model then cannot spell out garbage from bytes, which keeps small demos legible.
    pad, bos and eos are distinct special tokens; the chat template ends each turn with EOS.
    """
    texts = list(corpus) if corpus is not None else _DEFAULT_CORPUS
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                            show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: use bpe or word")
    tok.train_from_iterator(texts * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _tiny_config(arch: str, ids: dict, hidden_size: int, num_layers: int, num_heads: int,
                 max_positions: int, **config_overrides) -> PretrainedConfig:
    """The architecture's config at this size; `ids`: vocab size and special token ids."""
    if arch in ("llama", "qwen2"):
        config_cls = LlamaConfig if arch == "llama" else Qwen2Config
        return config_cls(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **ids,
            **config_overrides,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            **ids,
            **config_overrides,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}: use llama, qwen2 or gpt2")


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 1024,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vocab_size: int | None = None,
    **config_overrides,
) -> PreTrainedModel:
    """A randomly initialised causal LM of a real architecture, sized for the CPU.

    arch: "llama" | "qwen2" (both use q/k/v/o_proj) or "gpt2" (Conv1D c_attn/c_proj).
    vocab_size: a larger embedding than the tokenizer needs, to model a real LM head's cost.
    """
    ids = dict(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = _tiny_config(arch, ids, hidden_size, num_layers, num_heads, max_positions,
                          **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def build_tiny(
    arch: str = "llama", seed: int = 0, corpus: Iterable[str] | None = None, **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Tokenizer and model together, the pair most tests start from."""
    tokenizer = build_tokenizer(corpus)
    return build_model(tokenizer, arch=arch, seed=seed, **model_kwargs), tokenizer
