"""What the loop and the trainers need to know about the engine `accelerate` launched.

prefalign does no distribution of its own: `accelerate launch` (or `torchrun`) picks one
process per device and an engine (none, DDP, FSDP or DeepSpeed), and `Accelerator.prepare`
wraps the model. The engine matters to prefalign in a few places only:

- checkpoints: FSDP and DeepSpeed split weights or optimizer states across processes, so
  every process writes its part through accelerate's `save_state` (see train.checkpoint);
- frozen models (the reference of a full fine-tuning run) must be sharded like the policy
  under FSDP and ZeRO-3, else each process holds a whole copy (`prepare_frozen`);
- the final artifact under FSDP / ZeRO-3 needs the whole weights gathered (`full_model`).
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn

from prefalign.train.metrics import Gather


def has_accelerator_device() -> bool:
    api = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return bool(api.is_available()) if api is not None else torch.cuda.is_available()


def cpu_only_launch() -> bool:
    """Several processes (WORLD_SIZE > 1, set by torchrun / accelerate launch) on a machine
    without an accelerator: accelerate only sets up gloo data parallelism when told `cpu`."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator_device()


def engine_name(accelerator: Accelerator) -> str:
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp2" if getattr(accelerator, "is_fsdp2", False) else "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def sharded_states(accelerator: Accelerator) -> bool:
    """FSDP and every DeepSpeed stage: optimizer states (ZeRO-1/2) or weights too (FSDP,
    ZeRO-3) are split across processes, so no one process can write a checkpoint alone."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def shards_parameters(accelerator: Accelerator) -> bool:
    """FSDP and ZeRO-3: no process holds the whole weights between forward passes."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def gather_fn(accelerator: Accelerator) -> Gather | None:
    """None on one process, where nothing needs gathering."""
    if accelerator.num_processes == 1:
        return None
    return lambda obj: gather_object([obj])


def configure_engine(accelerator: Accelerator, model: nn.Module, batch_size: int,
                     max_grad_norm: float) -> None:
    """Fill in what accelerate cannot infer without a DataLoader, before `prepare`."""
    if accelerator.distributed_type == DistributedType.FSDP:
        _fill_wrap_classes(accelerator, model)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # prefalign accumulates itself (exactly, by loss units), so DeepSpeed sees one
        # micro-batch per backward and steps where the loop says the window ends.
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = batch_size
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = max_grad_norm


def _fill_wrap_classes(accelerator: Accelerator, model: nn.Module) -> None:
    """FSDP wraps each transformer block as its own unit. accelerate finds the block class
    in the prepared module's `_no_split_modules`; prefalign prepares wrappers (LogpsModel,
    RewardModel, PolicyWithValue) that lack it, so take it from the models inside."""
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "transformer_cls_names_to_wrap", None):
        return
    names = sorted({name for module in model.modules()
                    for name in (getattr(module, "_no_split_modules", None) or [])})
    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in names if n in present]
    if names:
        plugin.transformer_cls_names_to_wrap = names


def prepare_frozen(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """A frozen model (e.g. the reference), ready for no-grad forwards under the engine.

    One process or DDP: moved to the device (a frozen model needs no gradient sync).
    FSDP: sharded like the policy, else every process would hold a whole copy.
    ZeRO-3: a DeepSpeed engine without optimizer (as TRL does); ZeRO-1/2: on the device.
    """
    model.requires_grad_(False).eval()
    if accelerator.distributed_type == DistributedType.FSDP:
        return _shard_frozen_fsdp(model, accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and shards_parameters(accelerator):
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        return engine.eval()
    return model.to(accelerator.device)


def _shard_frozen_fsdp(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    plugin = accelerator.state.fsdp_plugin
    _fill_wrap_classes(accelerator, model)
    if getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        fully_shard(model, reshard_after_forward=plugin.reshard_after_forward,
                    mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin.set_auto_wrap_policy(model)
    return FSDP(model, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
                cpu_offload=plugin.cpu_offload, auto_wrap_policy=plugin.auto_wrap_policy,
                mixed_precision=plugin.mixed_precision_policy,
                use_orig_params=plugin.use_orig_params, device_id=accelerator.device)


# -- whole weights of a sharded model ------------------------------------------------------
# Trainer registers (module it prepared -> prepared wrapper, meta-device copy) under FSDP and
# ZeRO-3, so `full_model` can rebuild whole weights for the final artifact from anywhere.
_SHARDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def meta_copy(module: nn.Module) -> nn.Module:
    """The same module structure with every parameter on the meta device (no memory), the
    shell `full_model` fills with gathered weights. Buffers (rotary tables, small) are
    kept as CPU copies: state dicts leave the non-persistent ones out, and a forward on
    the filled copy needs them. Tied weights stay tied."""
    memo: dict[int, Any] = {}
    for _, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in memo:
            memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                           param.requires_grad)
    for _, buffer in module.named_buffers(remove_duplicate=False):
        memo.setdefault(id(buffer), buffer.detach().cpu().clone())
    return copy.deepcopy(module, memo)


def _materialize(shell: nn.Module) -> nn.Module:
    """A copy of `shell` whose meta parameters are (uninitialised) CPU tensors."""
    whole = copy.deepcopy(shell)
    made: dict[int, nn.Parameter] = {}
    for module in whole.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                   param.requires_grad)
                module._parameters[name] = made[id(param)]
    return whole


def _unwrapped_name(name: str) -> str:
    """A module's path without the wrappers FSDP1 inserts (the shell has none)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_NAMES)


_WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def register_sharded(module: nn.Module, prepared: nn.Module, shell: nn.Module) -> None:
    _SHARDED[module] = (weakref.ref(prepared), shell)


@contextmanager
def full_model(module: nn.Module, accelerator: Accelerator) -> Iterator[nn.Module | None]:
    """`module` with its whole weights, on the main process; None on the others.

    One process, DDP and ZeRO-1/2: `module` itself (every process holds whole weights).
    FSDP / ZeRO-3: every process takes part in gathering the weights (accelerate's
    `get_state_dict`); the main process gets a CPU copy of `module` holding them, so it
    can write the artifact (or score on the CPU) as on one process. ZeRO-3 gathers 16-bit
    weights and needs `zero3_save_16bit_model: true` in the accelerate config.
    """
    if not shards_parameters(accelerator):
        yield module
        return
    for root, (prepared_ref, shell) in list(_SHARDED.items()):
        path = next((_unwrapped_name(name) for name, m in root.named_modules() if m is module),
                    None)
        prepared = prepared_ref()
        if path is None or prepared is None:
            continue
        state = accelerator.get_state_dict(prepared)
        if not accelerator.is_main_process:
            yield None
            return
        whole = _materialize(shell)
        missing, _ = whole.load_state_dict(state, strict=False)
        if missing:
            raise RuntimeError(f"the gathered weights lack {missing[:3]}")
        yield whole.get_submodule(path) if path else whole
        return
    yield module if accelerator.is_main_process else None


def end_process_group() -> None:
    """After a command that ran under `accelerate launch` / torchrun: every process waits
    for the others, then the process group is destroyed. Left to interpreter exit, gloo's
    threads could be torn down while still joined to a peer, and a process would abort
    ("terminate called without an active exception") after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
