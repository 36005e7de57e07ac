"""Low-rank adapters (LoRA) for nn.Linear and GPT-2's Conv1D, saved in PEFT's format.

LoRA (Hu et al. 2021, arXiv:2106.09685, eq. 3) freezes a pretrained weight W0 and learns a
low-rank update:  h = W0 x + B A x * alpha / r,  with A (r, in) and B (out, r). A starts
Kaiming-uniform and B at zero, so training starts exactly at the base model. Rank-stabilised
LoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead.

The modules are named like PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), so the
adapter file written by `save_adapter` loads in `peft.PeftModel.from_pretrained` and adapters
written by PEFT load here. The reference model of DPO/PPO is the same model inside
`disable_adapters(model)`, never a second copy.

Stacked stages (an SFT adapter, then DPO on top, then PPO): models.load_causal_lm merges an
adapter into its base and keeps its factors (`MergedAdapters`), so the next stage's adapter
is saved as one exact combined adapter over the true (non-adapter) base (lora/stack.py).

Modules: layer (LoRALinear), inject (choosing targets, apply, merge, disable, unload),
peft_format (save_adapter/load_adapter), stack (stacked stages as one adapter).
"""

from prefalign.lora.inject import (
    apply_lora,
    default_target_modules,
    disable_adapters,
    find_target_modules,
    has_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
    print_trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from prefalign.lora.layer import LoRALinear, LoRASettings
from prefalign.lora.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    layer_factors,
    load_adapter,
    save_adapter,
)
from prefalign.lora.stack import Factors, MergedAdapters, stack_factors

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "Factors", "LoRALinear", "LoRASettings",
    "MergedAdapters", "apply_lora", "default_target_modules", "disable_adapters",
    "find_target_modules", "has_lora", "layer_factors", "load_adapter", "lora_layers",
    "lora_parameters", "merge_lora", "print_trainable_parameters", "save_adapter",
    "stack_factors", "unload_lora", "unmerge_lora",
]
