"""Putting LoRA layers into a model and taking them out again.

Choosing the target layers (PEFT's matching rules and per-architecture defaults), apply_lora,
merge/unmerge, disable_adapters (the reference model of DPO/PPO), unload_lora.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn
from transformers.pytorch_utils import Conv1D

from prefalign.lora.layer import LoRALinear, LoRASettings

_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Attention projections per `config.model_type`. For GPT-2, "attn.c_proj" is a dotted suffix:
# a bare "c_proj" would also match the MLP's output projection (mlp.c_proj).
_DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
         "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "starcoder2", "smollm3"],
        _QKVO,
    ),
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "gpt2": ["c_attn", "attn.c_proj"],
}
_FALLBACK_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")


def _matches(name: str, targets: Sequence[str] | str) -> bool:
    # PEFT's rule: a string is a regex on the whole qualified name; a list entry matches
    # the full name or a dotted suffix, so "attn.c_proj" matches "h.0.attn.c_proj" only.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """nn.Linear/Conv1D modules, skipping the internals of existing LoRA layers."""
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LoRALinear))
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and not (inside and name.startswith(inside)):
            yield name, module


def find_target_modules(model: nn.Module, names: Sequence[str] | str) -> list[str]:
    """Qualified names of nn.Linear/Conv1D modules matching `names`.

    A list entry matches a module's last name component or a full dotted suffix
    ("q_proj", "attn.c_proj"); a single string is a regex on the whole name, as in PEFT.
    "all-linear" means every linear layer except the output embedding (PEFT's meaning).
    """
    if names == "all-linear" or (not isinstance(names, str) and list(names) == ["all-linear"]):
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n, m in _linear_modules(model) if m is not out]
    return [n for n, _ in _linear_modules(model) if _matches(n, names)]


def default_target_modules(model: nn.Module) -> list[str]:
    """Attention projections for `model.config.model_type` (see _DEFAULT_TARGETS).

    GPT-2: ["c_attn", "attn.c_proj"], the fused q/k/v and the attention output, the same
    part of the network as q/k/v/o_proj elsewhere (PEFT's own default is only c_attn).
    Unknown types fall back to modules named q_proj/k_proj/v_proj/o_proj/query/key/value.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _DEFAULT_TARGETS:
        return list(_DEFAULT_TARGETS[model_type])
    found = {n.rsplit(".", 1)[-1] for n, _ in _linear_modules(model)}
    fallback = [n for n in _FALLBACK_NAMES if n in found]
    if fallback:
        return fallback
    raise ValueError(
        f"no default LoRA targets for model type {model_type!r}: pass target modules "
        f"explicitly, e.g. some of {_sample_names(model)}"
    )


def _sample_names(model: nn.Module, limit: int = 12) -> list[str]:
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in _linear_modules(model)})
    return names[:limit]


def apply_lora(
    model: nn.Module, targets: Sequence[str] | str | None = None, r: int = 8,
    alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
) -> nn.Module:
    """Wrap the target layers in LoRALinear, in place, and freeze every other parameter.

    targets: names as in `find_target_modules`; None means `default_target_modules(model)`.
    Afterwards only lora_A/lora_B weights require grad. Returns `model`.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA layers; one adapter per model is supported")
    if targets is None:
        targets = default_target_modules(model)
    elif not isinstance(targets, str):
        targets = list(dict.fromkeys(targets))
    names = find_target_modules(model, targets)
    if not names:
        raise ValueError(
            f"no nn.Linear/Conv1D module matches LoRA targets {targets!r}; linear modules in "
            f"this model include {_sample_names(model)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora)
        # A new module starts in training mode; follow the model's (eval: no LoRA dropout).
        setattr(parent, child, layer.train(model.training))
    model.lora_settings = LoRASettings(targets, r, alpha, dropout, use_rslora)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{qualified name: LoRALinear} in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The lora_A and lora_B weights of every LoRA layer (what the optimizer should get)."""
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print and return (trainable, total) parameter counts, in PEFT's familiar format."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
    return trainable, total


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W0 += scaling * B @ A). Merging twice is a no-op."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (W0 -= scaling * B @ A). Unmerging an unmerged model is a no-op."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every LoRALinear acts as its base layer: the DPO/PPO reference model.

    A merged model raises RuntimeError instead of unmerging and re-merging, which would
    rewrite the base weights on every reference pass and let rounding drift accumulate.
    The previous per-layer state is restored on exit, so the context nests.
    """
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError(
            "disable_adapters() on a merged LoRA model: the base weights already contain the "
            "adapter; call unmerge_lora(model) first"
        )
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.disabled = was_disabled


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by its base layer: merged (merge=True) or the original weights.

    The result is a plain HF model whose state_dict keys equal the original's. Parameters
    stay frozen as apply_lora left them.
    """
    for name, layer in lora_layers(model).items():
        (layer.merge if merge else layer.unmerge)()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    if "lora_settings" in vars(model):
        del model.lora_settings
    return model
