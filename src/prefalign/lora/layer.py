"""The LoRA layer: a frozen nn.Linear or GPT-2 Conv1D plus a trainable low-rank path.

h = W0 x + B A x * alpha / r (Hu et al. 2021, arXiv:2106.09685, eq. 3); alpha / sqrt(r) with
rank-stabilised LoRA (arXiv:2312.03732). Submodules are named as in PEFT (`base_layer`,
`lora_A`, `lora_B`, `lora_dropout`) so that state-dict keys match PEFT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class LoRASettings:
    """What `apply_lora` did, kept on the model (`model.lora_settings`) for `save_adapter`."""

    target_modules: list[str] | str
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False


def in_out_features(layer: nn.Module) -> tuple[int, int]:
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
        self.in_features, self.out_features = in_out_features(base_layer)
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
