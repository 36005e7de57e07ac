"""Loading and saving causal LMs and tokenizers from local directories (or a hub cache)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefalign.errors import PrefalignError
from prefalign.hub import downloads_allowed
from prefalign.models.checks import (
    adapter_base,
    check_fits_in_memory,
    check_weight_files,
    is_adapter_dir,
    not_found,
    pickle_hint,
    remote_code_hint,
)


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str | None = None,
                   text_as_chat: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory, with a pad token guaranteed.

    A tokenizer without a pad token (GPT-2, Llama) pads with EOS: padded positions are
    masked everywhere, so the id only has to exist.
    chat_template: a jinja file that replaces the tokenizer's chat template; text_as_chat:
    render text rows with the template (both: data.chat.configure_tokenizer).
    Offline first: a hub id is read from the local cache only, unless
    prefalign.hub.downloads_allowed() (--allow-download, HF_HUB_OFFLINE=0).
    """
    from prefalign.data.chat import configure_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                  local_files_only=not downloads_allowed())
    except (OSError, ValueError) as exc:
        raise not_found(path, "a tokenizer") or PrefalignError(
            f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}"
            f"{remote_code_hint(exc)}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise PrefalignError(f"tokenizer of {path} has neither a pad nor an EOS token; "
                                 "add a pad token to it before training")
        tokenizer.pad_token = tokenizer.eos_token
    return configure_tokenizer(tokenizer, chat_template, text_as_chat, name=path)


QUANTIZATIONS = ("4bit", "8bit")


def quantization_config(kind: str):
    """transformers' BitsAndBytesConfig for `kind`, or a PrefalignError saying what is missing.

    4bit is QLoRA's recipe (Dettmers et al. 2023, arXiv:2305.14314): NF4 weights, double
    quantization of the scales, bf16 compute.
    """
    if kind not in QUANTIZATIONS:
        raise PrefalignError(f"unknown quantization {kind!r}: use one of {QUANTIZATIONS}")
    flag = f"--load-in-{kind}"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PrefalignError(f"{flag} needs the bitsandbytes package "
                             "(pip install bitsandbytes) and a CUDA GPU")
    if not torch.cuda.is_available():
        raise PrefalignError(f"{flag} needs a CUDA GPU: bitsandbytes quantized weights "
                             "do not train on this machine")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_causal_lm(path: str, trust_remote_code: bool = False,
                   quantization: str | None = None) -> PreTrainedModel:
    """A causal LM from a model directory, a prefalign adapter directory or a cached hub id.

    An adapter directory (PEFT format, e.g. the output of `prefalign sft` with LoRA) is
    loaded onto its base model and merged, so the result is the fine-tuned model itself:
    the starting point and the reference of the next stage. The merged updates stay on the
    model as `model.merged_adapters` (lora.stack.MergedAdapters: the true base and each adapter's
    factors), so that a LoRA stage trained on it saves one adapter over the true base
    (lora.save_adapter) instead of naming this adapter directory as its base, which PEFT
    would load as base + last stage only.
    quantization: "4bit" | "8bit" loads the weights through bitsandbytes (CUDA only).

    Offline first: a hub id is read from the local cache only, unless
    prefalign.hub.downloads_allowed() (--allow-download, HF_HUB_OFFLINE=0). Before any
    weight is allocated, cut safetensors files, adapters that lead back to themselves and
    configs too large for the free memory are refused in one line (PrefalignError).
    """
    return _load_causal_lm(path, trust_remote_code, quantization, ())


def _load_causal_lm(path: str, trust_remote_code: bool, quantization: str | None,
                    chain: tuple[Path, ...]) -> PreTrainedModel:
    """load_causal_lm; `chain`: the adapter directories whose bases are being loaded."""
    from prefalign.lora import layer_factors, load_adapter, unload_lora
    from prefalign.lora.stack import MergedAdapters

    local = Path(path)
    extra = {}
    if quantization is not None:
        # Quantized weights are made on the GPU they will live on (this process's device).
        extra = {"quantization_config": quantization_config(quantization),
                 "device_map": {"": torch.cuda.current_device()}}
    if local.is_dir() and is_adapter_dir(local):
        if quantization is not None:
            # Merging needs full-precision base weights; a quantized merge would round twice.
            raise PrefalignError(f"{path} is a LoRA adapter: load it in {quantization} after "
                                 "merging (--merge writes final-merged) and pass that directory")
        base = adapter_base(local, chain)
        model = _load_causal_lm(base, trust_remote_code, None, (*chain, local.resolve()))
        # An older artifact may name another adapter directory as its base: already merged.
        earlier = getattr(model, "merged_adapters", None)
        try:
            load_adapter(model, local, trainable=False)
        except (ValueError, FileNotFoundError) as exc:
            raise PrefalignError(f"cannot load adapter {local}: {exc}") from None
        stage = layer_factors(model)
        model = unload_lora(model, merge=True)
        model.merged_adapters = (
            MergedAdapters(earlier.base, (*earlier.stages, stage)) if earlier
            else MergedAdapters(base, (stage,)))
        model.name_or_path = str(local)
        return model
    if local.is_dir():
        check_weight_files(local)
    check_fits_in_memory(path, AutoModelForCausalLM, trust_remote_code, quantization)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True,
                                                     local_files_only=not downloads_allowed(),
                                                     **extra)
    except (OSError, ValueError) as exc:
        raise not_found(path, "a causal LM") or PrefalignError(
            f"cannot load a causal LM from {path}: "
            f"{str(exc).splitlines()[0]}{pickle_hint(local)}{remote_code_hint(exc)}") from None
    return model


def prepare_for_training(model: PreTrainedModel, config) -> PreTrainedModel:
    """Apply LoRA (lora_r > 0) or unfreeze everything, and gradient checkpointing if asked."""
    from prefalign.lora import apply_lora

    if config.lora_r > 0:
        try:
            apply_lora(model, config.lora_targets, r=config.lora_r, alpha=config.lora_alpha,
                       dropout=config.lora_dropout)
        except ValueError as exc:
            raise PrefalignError(f"LoRA: {exc}") from None
    else:
        model.requires_grad_(True)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (LoRA runs have none).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    return model


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every dropout of `model` off, in place: each nn.Dropout (the model's and
    LoRA's lora_dropout) gets p = 0, as TRL's `disable_dropout_in_model` does, and so does
    the float `attention_dropout` that HF attention modules (Llama, Qwen2, Mistral, ...)
    pass to their attention kernel in training mode, which no nn.Dropout holds.

    Preference and RL losses compare log-probs of the same tokens under the policy and the
    reference (or across passes): with dropout on they differ by noise, not by the weights.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def save_policy(model: PreTrainedModel, tokenizer, directory: Path, merged_dir: Path | None = None,
                base_name: str | None = None) -> Path:
    """The final artifact: a PEFT-format adapter for LoRA runs, else an HF model directory.

    A LoRA run that started from an adapter directory writes one combined adapter over the
    true base model (see lora.save_adapter), so `peft.PeftModel.from_pretrained(base, directory)`
    gives every stage, not the last one alone.
    merged_dir: also write the LoRA-merged model there as a plain HF model directory.
    """
    import copy

    from prefalign.lora import has_lora, save_adapter, unload_lora

    directory.mkdir(parents=True, exist_ok=True)
    if has_lora(model):
        save_adapter(model, directory, base_model_name_or_path=base_name)
        if merged_dir is not None:
            merged = unload_lora(copy.deepcopy(model), merge=True)
            merged.config.use_cache = True
            merged.save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
    else:
        model.config.use_cache = True
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def model_reference(path: str) -> str:
    """How an artifact names its base: an absolute path for local dirs, else the hub id."""
    local = Path(path)
    return str(local.resolve()) if local.exists() else path
