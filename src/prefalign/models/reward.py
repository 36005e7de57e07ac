"""The reward model: a causal LM's backbone plus a scalar head on the last real token.

    reward(x) = w . h_last(x)        h_last (H,): the backbone's last hidden state at the last
                                     real token of x;  w (1, H): the `score` head

The artifact is a Hugging Face sequence-classification directory (LlamaForSequenceClassification,
GPT2ForSequenceClassification, ...: backbone keys under the architecture's prefix, `score.weight`,
config with `num_labels=1` and `pad_token_id`), so `AutoModelForSequenceClassification` and
TRL load it and compute the same scores.

Which token is "last": HF's sequence-classification models take the rightmost position whose
id is not `config.pad_token_id`. prefalign uses the same rule (restricted to attended
positions), so both agree under left and right padding. When pad == eos (GPT-2, Llama
tokenizers without a pad token) a trailing EOS counts as padding in HF, and so here: the
reward is read at the token before it, in training and in every later use alike.

Scoring needs a trained head: load_reward_model accepts only what check_reward_model
passes (num_labels=1 and `score.weight` present in the safetensors files, read from their
headers), so a causal LM is never scored through a head transformers made up. Reward
training starts from a causal LM with a fresh head through init_reward_model instead.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from prefalign.errors import PrefalignError
from prefalign.logprobs import position_ids_from_mask
from prefalign.masked import last_token_index
from prefalign.models.causal_lm import load_causal_lm, load_tokenizer
from prefalign.models.checks import check_fits_in_memory, check_weight_files, pickle_hint
from prefalign.models.reward_checks import (
    REWARD_MODEL_FIX,
    adapter_base_or_none,
    check_reward_model,
    is_sequence_classification_dir,
)
from prefalign.packing import PackedInputs, attention_bias


def reward_token_index(input_ids: Tensor, attention_mask: Tensor,
                       pad_token_id: int | None) -> Tensor:
    """(B, T) ids and mask -> (B,) long: the rightmost attended position whose id != pad.

    HF's rule (GenericForSequenceClassification): argmax of position * is_real, which is 0
    for a row with no real token. pad_token_id=None: the last attended position.
    """
    real = attention_mask.bool()
    if pad_token_id is not None:
        real = real & (input_ids != pad_token_id)
    return last_token_index(real)


# Architectures whose last decoder layer ends in a per-position dense MLP (no mixture of
# experts, whose routing statistics would see fewer tokens): see _last_mlp.
_DENSE_LAST_MLP = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2")


def _last_mlp(backbone: nn.Module) -> nn.Module | None:
    """The MLP of the backbone's last decoder layer when only read positions need it.

    After the last layer only the positions whose reward is read reach the score head (the
    final norm works per position), so that MLP (about two thirds of the layer's matmuls)
    may run on those positions alone; the other positions get zeros, which makes their
    last hidden states wrong but unread.
    """
    config = getattr(backbone, "config", None)
    if config is None or getattr(config, "model_type", None) not in _DENSE_LAST_MLP:
        return None
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    return getattr(layers[-1], "mlp", None) if layers else None


def _checkpointing(backbone: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_...
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(backbone), name):
            return bool(getattr(backbone, name))
    return False


def _select_rows(mlp: nn.Module, args: tuple) -> tuple | None:
    positions = getattr(mlp, "read_positions", None)
    if positions is None:
        return None
    hidden = args[0]
    mlp.read_shape = hidden.shape
    return (hidden.reshape(-1, hidden.shape[-1])[positions],) + args[1:]


def _scatter_rows(mlp: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    positions = getattr(mlp, "read_positions", None)
    if positions is None:
        return None
    shape = mlp.read_shape
    full = output.new_zeros(shape[:-1].numel(), output.shape[-1])
    return full.index_copy(0, positions, output).view(*shape[:-1], output.shape[-1])


def _classification_shell(config, trust_remote_code: bool = False) -> PreTrainedModel:
    """The architecture's *ForSequenceClassification with num_labels=1, weights on `meta`
    (no memory): its class, key prefix, head shape and head initialisation are what we need."""
    config = copy.deepcopy(config)
    config.num_labels = 1
    try:
        with init_empty_weights():
            return AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise PrefalignError(f"model type {config.model_type!r} has no sequence-classification "
                             f"class in transformers, so it cannot be a reward model: "
                             f"{str(exc).splitlines()[0]}") from None


class RewardModel(nn.Module):
    """backbone (the transformer of a causal LM, no LM head) + score: nn.Linear(H, 1).

    forward(input_ids (B, T), attention_mask (B, T)) -> rewards (B,) float32. Position ids
    come from the attention mask, so left- and right-padded batches give the same rewards.
    """

    def __init__(self, backbone: PreTrainedModel, score: nn.Linear, pad_token_id: int | None,
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.score = score
        self.pad_token_id = pad_token_id
        self.trust_remote_code = trust_remote_code
        self.last_mlp_at_reads = True  # see _last_mlp; False runs it everywhere
        mlp = _last_mlp(backbone)
        if mlp is not None and not getattr(mlp, "read_hooks", False):
            # Hooks, not a wrapper module: parameter names (checkpoints, saved models) stay.
            mlp.register_forward_pre_hook(_select_rows)
            mlp.register_forward_hook(_scatter_rows)
            mlp.read_hooks = True

    @contextmanager
    def _reads_at(self, positions: Tensor) -> Iterator[None]:
        """Run the last MLP only at `positions` (flat indices into the backbone's rows x
        sequence) during the backbone call inside. Off under gradient checkpointing,
        whose recomputation in backward happens outside this call."""
        mlp = _last_mlp(self.backbone) if self.last_mlp_at_reads else None
        if mlp is None or _checkpointing(self.backbone):
            yield
            return
        mlp.read_positions = positions
        try:
            yield
        finally:
            mlp.read_positions = None

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_causal_lm(cls, model: PreTrainedModel, pad_token_id: int | None,
                       trust_remote_code: bool = False) -> RewardModel:
        """The causal LM's backbone (`model.base_model`) with a fresh head, initialised as
        HF initialises the `score` of a sequence-classification model (normal with the
        config's initializer_range for Llama/GPT-2), which is also TRL's starting point."""
        backbone = model.base_model
        if backbone is model:
            raise PrefalignError(f"{type(model).__name__} exposes no separate backbone "
                                 "(base_model); a reward model needs a causal LM with a head")
        shell = _classification_shell(backbone.config, trust_remote_code)
        like = backbone.get_input_embeddings().weight
        head = shell.score
        score = nn.Linear(head.in_features, 1, bias=head.bias is not None,
                          device=like.device, dtype=like.dtype)
        shell._init_weights(score)
        return cls(backbone, score, pad_token_id, trust_remote_code)

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                packed: PackedInputs | None = None) -> Tensor:
        """packed: prefix-shared rows (packing.share_prefix_positions) the backbone reads
        instead; packed.source (B,) is where each sequence's reward token sits in them."""
        if packed is not None:
            reads = packed.source  # (B,) flat indices into the shared rows
            with self._reads_at(reads):
                out = self.backbone(
                    input_ids=packed.input_ids, position_ids=packed.position_ids,
                    attention_mask=attention_bias(self.backbone, packed.attention_mask),
                    use_cache=False)
        else:
            last = reward_token_index(input_ids, attention_mask, self.pad_token_id)
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            reads = rows * input_ids.shape[1] + last
            with self._reads_at(reads):
                out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids_from_mask(attention_mask),
                                    use_cache=False)
        pooled = out.last_hidden_state.flatten(0, 1)[reads]  # (B, H)
        return self.score(pooled.to(self.score.weight.dtype)).squeeze(-1).float()

    def to_sequence_classification(self) -> PreTrainedModel:
        """An HF *ForSequenceClassification holding this model's modules (shared, not copied).

        LoRA layers must be merged away first (lora.unload_lora), or the saved keys are
        PEFT's wrapped names that transformers does not know.
        """
        shell = _classification_shell(self.config, self.trust_remote_code)
        setattr(shell, shell.base_model_prefix, self.backbone)
        shell.score = self.score
        left = [n for n, p in shell.named_parameters() if p.is_meta]
        if left:
            raise PrefalignError(f"{type(shell).__name__} has parameters besides the backbone "
                                 f"and `score` ({left[:3]}); saving it is not supported")
        config = shell.config
        config.pad_token_id = self.pad_token_id
        config.get_text_config().pad_token_id = self.pad_token_id
        config.use_cache = True
        return shell

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> Path:
        """Write an HF sequence-classification directory (+ the tokenizer when given)."""
        from prefalign.lora import has_lora

        if has_lora(self.backbone):
            raise ValueError("merge the LoRA layers first: lora.unload_lora(model.backbone)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_sequence_classification().save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory


def load_reward_model(path: str | Path, tokenizer=None,
                      trust_remote_code: bool = False) -> RewardModel:
    """A RewardModel from a reward-model directory: an HF sequence-classification directory
    with num_labels=1 and its `score` weights saved (e.g. OUTPUT/final of `prefalign
    reward`), or a LoRA adapter directory on one (merged in). Anything else, a causal LM
    above all, is refused by check_reward_model: its head would be random. To start
    reward training from a causal LM, use init_reward_model.

    The pad id: the saved config's (what HF reads), else the tokenizer's; the tokenizer is
    loaded from `path` when not given.
    """
    local = check_reward_model(path)
    path = str(path)
    if tokenizer is None:
        tokenizer = load_tokenizer(str(local), trust_remote_code)
    base = adapter_base_or_none(local)
    if base is not None:
        return _load_adapter_reward_model(local, base, tokenizer, trust_remote_code)
    hf = _load_classification(local, path, trust_remote_code)
    pad = hf.config.get_text_config().pad_token_id
    return RewardModel(hf.base_model, hf.score, tokenizer.pad_token_id if pad is None else pad,
                       trust_remote_code)


def _load_classification(local: Path, path: str, trust_remote_code: bool) -> PreTrainedModel:
    check_weight_files(local)
    check_fits_in_memory(str(local), AutoModelForSequenceClassification, trust_remote_code)
    try:
        hf, info = AutoModelForSequenceClassification.from_pretrained(
            str(local), trust_remote_code=trust_remote_code, use_safetensors=True,
            output_loading_info=True, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PrefalignError(f"cannot load a reward model from {path}: "
                             f"{str(exc).splitlines()[0]}{pickle_hint(local)}") from None
    score = getattr(hf, "score", None)
    if not isinstance(score, nn.Linear) or score.out_features != 1:
        raise PrefalignError(f"{path}: {type(hf).__name__} has no scalar `score` head, not a "
                             f"reward model: {REWARD_MODEL_FIX}")
    # The headers said the head is there; this also catches a head the model class
    # names differently (transformers initialised it at random).
    fresh = [k for k in info.get("missing_keys", ()) if k.split(".")[0] == "score"]
    if fresh:
        raise PrefalignError(f"{path}: the checkpoint holds no weights for {fresh[0]}, so the "
                             f"head would be random, not a reward model: {REWARD_MODEL_FIX}")
    return hf


def _load_adapter_reward_model(adapter: Path, base: str, tokenizer,
                               trust_remote_code: bool) -> RewardModel:
    """A LoRA adapter (PEFT format, keys of the sequence-classification model) merged into
    the reward model it was trained on."""
    from prefalign.lora import load_adapter, unload_lora

    model = load_reward_model(base, tokenizer, trust_remote_code)
    hf = model.to_sequence_classification()  # shares the modules: merging reaches `model`
    try:
        load_adapter(hf, adapter, trainable=False)
    except (ValueError, FileNotFoundError) as exc:
        raise PrefalignError(f"cannot load adapter {adapter}: {exc}") from None
    unload_lora(hf, merge=True)
    return RewardModel(getattr(hf, hf.base_model_prefix), hf.score, model.pad_token_id,
                       trust_remote_code)


def init_reward_model(path: str | Path, tokenizer=None,
                      trust_remote_code: bool = False) -> RewardModel:
    """The starting point of reward training (and of a PPO critic's backbone): a reward
    model directory as load_reward_model loads it (its trained head), else a causal LM or
    an adapter directory such as an SFT output (merged onto its base) with a fresh head.
    A sequence-classification directory that is not a reward model is refused."""
    path = str(path)
    local = Path(path).expanduser()
    base = adapter_base_or_none(local) if local.is_dir() else None
    if is_sequence_classification_dir(local) or (
            base is not None and is_sequence_classification_dir(Path(base).expanduser())):
        return load_reward_model(path, tokenizer, trust_remote_code)
    if tokenizer is None:
        tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_causal_lm(path, trust_remote_code)
    return RewardModel.from_causal_lm(model, tokenizer.pad_token_id, trust_remote_code)
