"""LoRA adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors.

`save_adapter` writes what `peft.PeftModel.from_pretrained` loads, and `load_adapter` reads
adapters that PEFT wrote. A model holding merged adapters (stacked stages) is saved as one
combined adapter over its true base (stack.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefalign.lora.inject import apply_lora, find_target_modules, has_lora, lora_layers
from prefalign.lora.layer import LoRASettings, in_out_features
from prefalign.lora.stack import Factors, MergedAdapters, stack_factors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model (CAUSAL_LM and others)

# PEFT config keys that change which weights exist or the math, with their neutral values:
# written as such by save_adapter, refused by load_adapter unless neutral (None/False/empty).
_UNSUPPORTED = {
    "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    "target_parameters": None, "trainable_token_indices": None, "lora_bias": False,
    "layer_replication": None, "use_qalora": False, "use_bdlora": None,
    "alora_invocation_tokens": None,
}


def save_adapter(
    model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors in PEFT's LoRA format.

    Keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` with no
    adapter name, as PEFT saves them. Returns the directory.

    A model whose weights hold merged adapters (`model.merged_adapters`, set when it was
    loaded from an adapter directory) is saved as one combined adapter over their true base:
    `stack_factors` of the merged stages and this one, r = the sum of their ranks,
    lora_alpha = r, target_modules = the adapted modules' full names, and
    base_model_name_or_path = that base, whatever `base_model_name_or_path` says. Loaded
    on the base, by PEFT or here, it gives the same model as every stage applied in turn.
    """
    layers = lora_layers(model)
    settings = getattr(model, "lora_settings", None)
    if not layers or settings is None:
        raise ValueError("the model has no LoRA adapter to save: call apply_lora first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merged: MergedAdapters | None = getattr(model, "merged_adapters", None)
    if merged is not None:
        r, stacked = stack_factors([*merged.stages, layer_factors(model)])
        conv1d = any(isinstance(m, Conv1D) or getattr(m, "is_conv1d", False)
                     for m in (model.get_submodule(n) for n in stacked))
        config = _adapter_config(merged.base, r, r, settings.dropout, sorted(stacked), conv1d,
                                 use_rslora=False)
        tensors = {f"{_PREFIX}{name}.{part}.weight": t for name, (a, b) in stacked.items()
                   for part, t in (("lora_A", a), ("lora_B", b))}
    else:
        if base_model_name_or_path is None:
            base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path",
                                              None)
        config = _adapter_config(base_model_name_or_path, settings.r, settings.alpha,
                                 settings.dropout, settings.target_modules,
                                 any(m.is_conv1d for m in layers.values()), settings.use_rslora)
        tensors = {}
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part).weight
                tensors[f"{_PREFIX}{name}.{part}.weight"] = weight.detach().cpu().contiguous()
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def layer_factors(model: nn.Module) -> Factors:
    """{module name: (A (r, in), B * scaling (out, r))} of every LoRA layer: float32 CPU
    copies, so that B @ A is the layer's update in the (out, in) layout of nn.Linear."""
    out = {}
    for name, layer in lora_layers(model).items():
        a = layer.lora_A.weight.detach().float().cpu().clone()
        b = (layer.lora_B.weight.detach().float() * layer.scaling).cpu()
        out[name] = (a, b)
    return out


def _adapter_config(base: str | None, r: int, alpha: float, dropout: float, targets,
                    conv1d: bool, use_rslora: bool) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        # PEFT flips this per layer anyway; True records that Conv1D weights are (in, out).
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "use_rslora": use_rslora,
        "init_lora_weights": True,
        **_UNSUPPORTED,
    }


def _read_adapter_config(directory: Path) -> LoRASettings:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}")
    try:
        config = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is cut short or not JSON ({exc}); restore it from the run "
                         "that wrote it") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, only LORA is supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} is not supported, only 'none'")
    refused = [k for k in _UNSUPPORTED if config.get(k) not in (None, False, {}, [], "")]
    if refused:
        raise ValueError(f"{path}: unsupported LoRA options {refused} (values {[config[k] for k in refused]})")
    absent = [k for k in ("r", "lora_alpha", "target_modules") if not config.get(k)]
    if absent:
        raise ValueError(f"{path}: {absent} missing or empty")
    targets = config["target_modules"]
    return LoRASettings(
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        r=int(config["r"]), alpha=config["lora_alpha"],
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
    )


def _strip_key(key: str) -> str:
    # Some writers keep the adapter name ("...lora_A.default.weight"); PEFT itself drops it.
    key = key.removeprefix(_PREFIX)
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = True) -> nn.Module:
    """Apply the LoRA adapter saved in `directory` (PEFT format) to `model`, in place.

    Keys and shapes are checked before the model is touched, so a bad adapter leaves the
    model unchanged. trainable=False freezes the loaded LoRA weights too (inference).
    """
    directory = Path(directory)
    settings = _read_adapter_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}")
    from prefalign.safetensors_files import file_problem as safetensors_problem

    problem = safetensors_problem(weights_path)  # safetensors' own error names no file
    if problem is not None:
        raise ValueError(f"{directory}: {problem}; copy the adapter directory again")
    state = {_strip_key(k): v for k, v in load_file(str(weights_path)).items()}
    if has_lora(model):
        raise ValueError("the model already has LoRA layers; load the adapter into a plain model")
    names = find_target_modules(model, settings.target_modules)
    shapes = {}
    for name in names:
        in_f, out_f = in_out_features(model.get_submodule(name))
        shapes[f"{name}.lora_A.weight"] = (settings.r, in_f)
        shapes[f"{name}.lora_B.weight"] = (out_f, settings.r)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"adapter {weights_path} does not fit this model: missing keys {missing[:5]} "
            f"({len(missing)} in all), unexpected keys {unexpected[:5]} ({len(unexpected)} in all)"
        )
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {s}" for k, s in shapes.items()
             if tuple(state[k].shape) != s]
    if wrong:
        raise ValueError(f"adapter {weights_path} has mismatched shapes: {wrong[:5]}")
    apply_lora(model, settings.target_modules, settings.r, settings.alpha, settings.dropout,
               settings.use_rslora)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            for part in ("lora_A", "lora_B"):
                param = getattr(layer, part).weight
                param.copy_(state[f"{name}.{part}.weight"].to(param.device, param.dtype))
                param.requires_grad_(trainable)
    return model

