"""Checks made before a model is loaded: each refuses, in one line, what would otherwise
fail later with an error that names neither the file nor the fix (a cut weight file, an
adapter that leads back to itself, weights too large for the free memory, a tokenizer
whose ids the model cannot embed, pickled weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from prefalign.errors import PrefalignError
from prefalign.hub import DOWNLOAD_FIX, downloads_allowed
from prefalign.safetensors_files import file_problem as safetensors_problem


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


def is_adapter_dir(path: Path) -> bool:
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
