"""Is a directory a reward model? Read from its config.json and safetensors headers only.

Every place that scores with a reward model (score, evaluate, best-of-N and iterate
scorers, PPO) loads it through models.reward.load_reward_model, which calls
check_reward_model first: transformers would otherwise give a causal LM, a num_labels=2
classifier or a checkpoint without head weights a freshly initialised `score` and every
score would be noise.
"""

from __future__ import annotations

from pathlib import Path

from prefalign.errors import PrefalignError
from prefalign.models.checks import adapter_base, is_adapter_dir, read_json_file
from prefalign.safetensors_files import read_header

REWARD_MODEL_FIX = ("train one with `prefalign reward` or pass a sequence-classification "
                    "checkpoint with num_labels=1")
_HEAD_KEY = "score.weight"


def _local_dir(path: str) -> Path:
    """A local directory, or the snapshot of a hub id already in the local cache."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from prefalign.hub import DOWNLOAD_FIX, downloads_allowed

    if not local.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, local_files_only=not downloads_allowed()))
        except Exception:  # not a repo id, or not cached: either way nothing to load
            pass
    fix = "" if downloads_allowed() else f"; give a local directory, or {DOWNLOAD_FIX}"
    raise PrefalignError(f"reward model {path}: no such directory, and no model of that name "
                         f"in the local hub cache{fix}")


def _safetensors_header(path: Path) -> dict:
    """{tensor name: {dtype, shape, data_offsets}} of a .safetensors file; no tensor is read."""
    try:
        return read_header(path)[0]
    except (OSError, ValueError) as exc:
        raise PrefalignError(f"cannot read the safetensors header of {path}: {exc}") from None


def head_shape(directory: Path) -> tuple[int, ...] | None:
    """The saved shape of `score.weight` in a model directory's safetensors files (through
    model.safetensors.index.json when sharded), None when no file holds it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shard = (read_json_file(index).get("weight_map") or {}).get(_HEAD_KEY)
        if shard is None or not (directory / shard).is_file():
            return None
        files = [directory / shard]
    else:
        files = sorted(directory.glob("*.safetensors"))
    for file in files:
        entry = _safetensors_header(file).get(_HEAD_KEY)
        if entry is not None:
            return tuple(entry.get("shape") or ())
    return None


def _what_is(directory: Path) -> str | None:
    """None for a reward model directory, else what it is instead (completes "X is ...")."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        return "not a model directory (no config.json)"
    config = read_json_file(config_file)
    architectures = [str(a) for a in config.get("architectures") or []]
    arch = ", ".join(architectures)
    if not architectures:
        return (f"a model whose config.json names no architectures (model_type "
                f"{config.get('model_type')!r}), so no score head can be found in it")
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return f"a causal language model ({arch})"
        return f"a {arch} model"
    # PretrainedConfig writes id2label for num_labels != 2 and defaults to 2 without it.
    labels = config.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) else int(config.get("num_labels", 2))
    if num_labels != 1:
        return (f"a sequence-classification checkpoint with num_labels={num_labels} ({arch}), "
                "which gives one score per label")
    if not any(directory.glob("*.safetensors")):
        from prefalign.models.checks import pickle_hint

        hint = pickle_hint(directory) or ": it has no *.safetensors weight files"
        raise PrefalignError(f"cannot load a reward model from {directory}{hint}")
    shape = head_shape(directory)
    if shape is None:
        return (f"a {arch} checkpoint whose weight files hold no `{_HEAD_KEY}`, so its head "
                "would be randomly initialised")
    if len(shape) != 2 or shape[0] != 1:
        return f"a {arch} checkpoint whose `{_HEAD_KEY}` has shape {list(shape)}, not [1, hidden]"
    return None


def adapter_base_or_none(directory: Path) -> str | None:
    """The base model an adapter directory names (None: not an adapter directory)."""
    return adapter_base(directory) if is_adapter_dir(directory) else None


def check_reward_model(path: str | Path) -> Path:
    """The local directory of a reward model (a trained scalar head whose weights are in
    its safetensors files), else a PrefalignError in one line saying what `path` is.

    Reads config.json and safetensors headers only. A LoRA adapter directory passes when
    its base model does.
    """
    local = _local_dir(str(path))
    base = adapter_base_or_none(local)
    if base is not None:
        try:
            base_dir = _local_dir(base)
        except PrefalignError as exc:
            raise PrefalignError(f"{path} is a LoRA adapter on {base}, which cannot be "
                                 f"loaded: {exc}") from None
        problem = _what_is(base_dir)
        if problem is not None:
            raise PrefalignError(f"{path} is a LoRA adapter on {base}, which is "
                                 f"{problem}, not a reward model: {REWARD_MODEL_FIX}")
        return local
    problem = _what_is(local)
    if problem is not None:
        raise PrefalignError(f"{path} is {problem}, not a reward model: "
                             f"{REWARD_MODEL_FIX}")
    return local



def is_sequence_classification_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    architectures = read_json_file(config).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)

