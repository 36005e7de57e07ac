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
is saved as one exact combined adapter over the true (non-adapter) base (lora_stack.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefalign.lora_stack import Factors, MergedAdapters, stack_factors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model (CAUSAL_LM and others)

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

# PEFT config keys that change which weights exist or the math, with their neutral values:
# written as such by save_adapter, refused by load_adapter unless neutral (None/False/empty).
_UNSUPPORTED = {
    "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    "target_parameters": None, "trainable_token_indices": None, "lora_bias": False,
    "layer_replication": None, "use_qalora": False, "use_bdlora": None,
    "alora_invocation_tokens": None,
}


@dataclass(frozen=True)
class LoRASettings:
    """What `apply_lora` did, kept on the model (`model.lora_settings`) for `save_adapter`."""

    target_modules: list[str] | str
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False


def _in_out(layer: nn.Module) -> tuple[int, int]:
    # Conv1D stores its weight as (in, out) and computes x @ W + b. nn.Linear subclasses
    # report their sizes: a bitsandbytes Linear4bit's weight is packed into another shape.
    if isinstance(layer, Conv1D):
        return tuple(layer.weight.shape)
    return layer.in_features, layer.out_features


class LoRALinear(nn.Module):
    """A frozen nn.Linear or Conv1D plus a trainable low-rank path (arXiv:2106.09685).

    forward(x) = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, scaling = alpha / r
    (alpha / sqrt(r) with use_rslora). x (..., in) -> (..., out). When merged or disabled the
    forward is base_layer(x) alone. The LoRA weights live in float32 when the base is fp16/bf16
    (as PEFT does) so that small updates are not lost to rounding; the LoRA path is computed in
    their dtype and cast back to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"LoRA wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base_layer
        self.is_conv1d = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.in_features, self.out_features = _in_out(base_layer)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # Quantized (integer) base weights get float32 adapters too, as in QLoRA.
        low = weight.dtype in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point
        dtype = torch.float32 if low else weight.dtype
        kw = dict(bias=False, device=weight.device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)  # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # weight (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """B = 0 (paper, section 4.1) so the update starts at zero; A ~ Kaiming-uniform(a=sqrt(5)),
        i.e. U(-1/sqrt(in), 1/sqrt(in)), as PEFT and loralib do (the paper says Gaussian)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # HF code sometimes reads `proj.weight` (e.g. its dtype); answer with the base weight.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.is_conv1d else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += scaling * B @ A, so the forward costs what the base layer costs. No-op if merged."""
        if self.merged:
            return
        if self.disabled:
            raise RuntimeError("cannot merge LoRA while adapters are disabled")
        if not self.base_layer.weight.dtype.is_floating_point:
            raise RuntimeError("cannot merge LoRA into quantized base weights: save the adapter "
                               "and merge it into the full-precision base model")
        w = self.base_layer.weight
        # Add in float32 so a bf16 base loses as little as possible of the update.
        w.copy_((w.float() + self.delta_weight().float()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= scaling * B @ A (exact up to float rounding). No-op if not merged."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight().float()).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        lora_x = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        delta = self.lora_B(self.lora_A(lora_x)) * self.scaling
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


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
        in_f, out_f = _in_out(model.get_submodule(name))
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

