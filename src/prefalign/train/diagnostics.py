"""Checks that name the likely cause of a run that cannot learn, before it wastes hours.

The classic silent failure of LoRA training: the adapters get no gradient (frozen, left out
of the optimizer, or outside the autograd graph), so the loss sits where it started (DPO:
log 2 = 0.693; a reward model: 50% accuracy) while everything looks normal. After the
first backward pass the gradients tell whether that is happening; the training loop asks
`lora_gradient_problem` once and prints its answer as one warning line. A loss with no
gradient path at all stops the run with `detached_loss_problem`'s line instead of torch's
opaque "element 0 of tensors does not require grad".
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prefalign.lora import lora_layers


def lora_gradient_problem(model: nn.Module, optimized: Iterable[torch.Tensor]) -> str | None:
    """Why the LoRA weights of `model` will not train, or None when they will (or it has none).

    Call after the first backward pass, before the optimizer step. optimized: the tensors
    the optimizer updates (its param groups). Problems, in order:
    - no LoRA weight is in the optimizer: frozen (requires_grad False), or left out of it;
    - some are left out;
    - every optimized LoRA weight has a None or all-zero gradient: the loss does not
      depend on the adapters. (At step 1 only A's gradient is 0, since B starts at zero;
      B's is not, unless the adapters are bypassed.)
    """
    layers = lora_layers(model)
    if not layers:
        return None
    weights = [(f"{name}.{part}.weight", getattr(layer, part).weight)
               for name, layer in layers.items() for part in ("lora_A", "lora_B")]
    ids = {id(p) for p in optimized}
    trained = [(n, p) for n, p in weights if id(p) in ids]
    if not trained:
        frozen = sum(not p.requires_grad for _, p in weights)
        why = (f"{frozen} of them have requires_grad=False" if frozen
               else "they require grad but are not in the optimizer's param groups")
        return (f"none of the {len(weights)} LoRA weights is being trained ({why}): the "
                "adapters will not change and the loss will not fall for them; "
                "lora.apply_lora makes them trainable, build the optimizer after it")
    if len(trained) < len(weights):
        left = [n for n, p in weights if id(p) not in ids]
        return (f"{len(left)} of {len(weights)} LoRA weights are not being trained "
                f"(e.g. {left[0]}): they are frozen or missing from the optimizer")
    if all(p.grad is None or not torch.any(p.grad) for _, p in trained):
        merged = any(layer.merged or layer.disabled for layer in layers.values())
        cause = ("the LoRA layers are merged or disabled during the training forward"
                 if merged else "the loss is computed under torch.no_grad(), inside "
                 "disable_adapters(), or from detached outputs")
        return (f"no gradient reached the {len(trained)} LoRA weights after the first "
                f"backward pass (all None or zero), so the loss will stay where it started "
                f"(DPO: 0.693): {cause}")
    return None


def _canonical(value: str | list[dict]) -> str:
    text = value if isinstance(value, str) else "\n".join(str(m.get("content", "")) for m in value)
    return " ".join(text.casefold().split())


def near_identical_pairs(examples: Iterable[dict]) -> list[int]:
    """Indices of normalised examples (data.formats) whose chosen and rejected differ only
    in case or whitespace: pairs that carry (almost) no preference signal.

    Exact duplicates never get here: normalisation drops chosen == rejected rows and
    counts them (NormalizeReport.dropped["chosen equals rejected"]).
    """
    return [i for i, e in enumerate(examples)
            if _canonical(e["chosen"]) == _canonical(e["rejected"])]


def detached_loss_problem(model: nn.Module) -> str:
    """The one line for a training loss that has no gradient path to any trainable weight
    (backward would fail with torch's "does not require grad")."""
    bypassed = any(layer.merged or layer.disabled for layer in lora_layers(model).values())
    cause = ("the LoRA layers are merged or disabled during the training forward" if bypassed
             else "it is computed under torch.no_grad(), inside disable_adapters(), or from "
             "detached outputs, or every weight it depends on is frozen")
    return (f"the training loss does not depend on any trainable parameter, so nothing can "
            f"learn (a DPO loss would stay at 0.693): {cause}")
