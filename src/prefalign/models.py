"""Loading and saving models and tokenizers from local directories (or a hub cache)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefalign.errors import PrefalignError
from prefalign.hub import DOWNLOAD_FIX, downloads_allowed
from prefalign.safetensors_files import file_problem as safetensors_problem


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


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel,
                     path: str) -> None:
    """PrefalignError unless `model` embeds every token id `tokenizer` can produce.

    An id past the embedding table fails only when a batch holds it: mid-run, as an
    IndexError on the CPU or a device-side assert on CUDA, neither naming the cause.
    """
    ids = max(tokenizer.get_vocab().values()) + 1  # added tokens may leave gaps: not len()
    rows = model.get_input_embeddings().num_embeddings
    if ids > rows:
        raise PrefalignError(
            f"{path}: the tokenizer has token ids up to {ids - 1} but the model embeds only "
            f"{rows} (ids 0 to {rows - 1}); use the tokenizer the model was trained with, or "
            f"resize the model's embeddings (model.resize_token_embeddings({ids})) and save it")


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def not_found(path: str, what: str) -> PrefalignError | None:
    """The error for a `path` that is neither a local path nor (while downloads are off)
    in the local hub cache, naming the fix; None when `path` exists or downloads are on."""
    if Path(path).expanduser().exists():
        return None
    if downloads_allowed():
        return None
    return PrefalignError(f"cannot load {what} from {path}: no such directory, and no model "
                          f"of that name in the local hub cache; give a local directory, "
                          f"or {DOWNLOAD_FIX}")


def check_weight_files(directory: Path) -> None:
    """PrefalignError naming the first cut or unreadable *.safetensors file of a local model
    directory: safetensors' own error is a traceback ("incomplete metadata") that names no
    file."""
    for file in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem is not None:
            raise PrefalignError(f"{directory}: {problem}; the copy or download was cut short "
                                 "or the file is damaged: copy the model directory again")


def read_json_file(file: Path) -> dict:
    """A JSON object from `file`, or a PrefalignError naming the file (a cut copy)."""
    try:
        data = json.loads(file.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrefalignError(f"cannot read {file}: it is cut short or not JSON ({exc}); "
                             "restore it from the run that wrote it") from None
    if not isinstance(data, dict):
        raise PrefalignError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def adapter_base(directory: Path, chain: tuple[Path, ...] = ()) -> str:
    """The base model an adapter directory names, refusing a missing base and a base that
    leads back to an adapter of `chain` (the adapters being loaded, outermost first): a
    self-referencing or cyclic adapter would otherwise recurse until Python gives up."""
    from prefalign.lora import ADAPTER_CONFIG

    file = directory / ADAPTER_CONFIG
    base = read_json_file(file).get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise PrefalignError(f"{file} names no base_model_name_or_path; cannot tell which "
                             "model the adapter belongs to")
    here = (*chain, directory.resolve())
    target = Path(base).expanduser()
    if target.exists() and target.resolve() in here:
        loop = " -> ".join(str(p) for p in (*here[here.index(target.resolve()):], target))
        raise PrefalignError(f"{file}: base_model_name_or_path {base!r} leads back to an "
                             f"adapter being loaded ({loop}); set it to the base model's "
                             "directory or hub id")
    return base


# Bytes per parameter of the dtypes a config.json names (others count 4, as fp32).
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


def _available_bytes(on_gpu: bool) -> int | None:
    """Free memory where the weights will be made: the GPU's (torch.cuda.mem_get_info) or
    the machine's MemAvailable (/proc/meminfo; None where there is none, e.g. macOS)."""
    if on_gpu:
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def parameter_count(config, model_class=AutoModelForCausalLM, trust_remote_code: bool = False
                    ) -> int | None:
    """Parameters of the model `config` describes, counted on the meta device (no memory),
    tied weights once; None when the config builds no model (from_pretrained says why).
    torch.device("meta") makes every tensor there; accelerate's init_empty_weights would
    allocate each parameter on the CPU first and then move it."""
    try:
        with torch.device("meta"):
            model = model_class.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # unknown model type, remote code not allowed, ...: not ours to judge
        return None
    return sum(p.numel() for p in model.parameters())


def check_fits_in_memory(path: str, model_class=AutoModelForCausalLM,
                         trust_remote_code: bool = False, quantization: str | None = None) -> None:
    """PrefalignError when the weights `path`'s config.json describes cannot fit in the free
    memory they would be made in, before any is allocated: a config that asks for enormous
    dimensions would otherwise allocate until the machine swaps or the process is killed.
    Weights take params x dtype bytes (the config's dtype; 1 byte in 8-bit, half in 4-bit)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            local_files_only=not downloads_allowed())
    except Exception:  # from_pretrained reports an unreadable config in its own words
        return
    params = parameter_count(config, model_class, trust_remote_code)
    if params is None:
        return
    if quantization is not None:
        per_param = 0.5 if quantization == "4bit" else 1.0
    else:
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
        per_param = _DTYPE_BYTES.get(dtype, 4)
    available = _available_bytes(on_gpu=quantization is not None)
    needed = params * per_param
    if available is not None and needed > available:
        where = "free GPU memory" if quantization is not None else "available memory"
        raise PrefalignError(
            f"{path}: its config.json describes {params:,} parameters, {needed / 2**30:,.1f} GiB "
            f"of weights, but only {available / 2**30:,.1f} GiB of {where} is left; check the "
            "config's dimensions (hidden_size, num_hidden_layers, vocab_size, ...) or use a "
            "machine with more memory")


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
    model as `model.merged_adapters` (lora_stack.MergedAdapters: the true base and each adapter's
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
    from prefalign.lora_stack import MergedAdapters

    local = Path(path)
    extra = {}
    if quantization is not None:
        # Quantized weights are made on the GPU they will live on (this process's device).
        extra = {"quantization_config": quantization_config(quantization),
                 "device_map": {"": torch.cuda.current_device()}}
    if local.is_dir() and _is_adapter_dir(local):
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


def remote_code_hint(exc: Exception) -> str:
    """The fix when transformers refused a model's own Python code: it runs only behind the
    explicit flag of the command being run, never because a model or data file asks."""
    if "trust_remote_code" not in str(exc) and "custom code" not in str(exc):
        return ""
    return ("; that Python code runs only with the --trust-remote-code flag of a command "
            "that has one (the trainers, score, evaluate): read it first")


def pickle_hint(directory: Path) -> str:
    """Why a directory holding only pickled weights (.bin, .pt) is not loaded, and the fix."""
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return ""
    if not any(directory.glob("*.bin")) and not any(directory.glob("*.pt")):
        return ""
    return ("; weights are read from safetensors only (unpickling a .bin can run code): "
            "convert them where you trust the file, e.g. load it with transformers and "
            "save_pretrained() it again")


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
