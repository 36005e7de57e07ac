"""The implementation guide's names for prefalign's functions.

The RLHF implementation guide (18 functions in 7 files: LoRA, data, reward model, DPO, PPO,
evaluation) names its functions differently from prefalign. Each name here is a thin
delegation to the real implementation, with the guide's call shape, so a reader of the
guide can type what the guide says:

    from prefalign.guide import apply_lora_to_model, compute_dpo_loss, ...

No math lives here: LoRA is prefalign.lora, log-probs prefalign.logprobs, the losses
prefalign.losses, GAE prefalign.rl. docs/from-the-guide.md maps every guide function to
its prefalign module, with a runnable snippet each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from prefalign import lora
from prefalign.data.formats import HH_ASSISTANT, _looks_hh, _split_hh, normalize_rows
from prefalign.data.sources import load_rows
from prefalign.data.tokenize import tokenize_preferences
from prefalign.errors import DataError
from prefalign.logprobs import completion_logps, position_ids_from_mask
from prefalign.lora import print_trainable_parameters
from prefalign.losses import LossParams, PairLogps, bradley_terry_loss, dpo_loss
from prefalign.masked import masked_whiten
from prefalign.models import RewardModel, ValueHead
from prefalign.rl import gae

__all__ = [
    "LoRALinear", "PreferenceDataset", "PreferenceExample", "RewardModel", "ValueHead",
    "apply_lora_to_model", "compute_advantages", "compute_dpo_loss", "compute_log_probs",
    "compute_preference_loss", "extract_prompt_and_response", "find_target_modules",
    "get_lora_parameters", "merge_lora_weights", "print_trainable_parameters",
]


# -- Phase 1: LoRA (prefalign.lora) ------------------------------------------------------

class LoRALinear(lora.LoRALinear):
    """prefalign.lora.LoRALinear with the guide's defaults: LoRALinear(base, r=16).

    Only the defaults differ (alpha = 2 r unless given); it is the same class for
    apply_lora, merge and save_adapter (a subclass, so isinstance checks hold).
    """

    def __init__(self, base_layer: nn.Module, r: int = 16, alpha: float | None = None,
                 dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__(base_layer, r, 2 * r if alpha is None else alpha, dropout, use_rslora)


def find_target_modules(model: nn.Module, target_names: Sequence[str] | str | None = None
                        ) -> list[str]:
    """Qualified names of the Linear/Conv1D layers matching target_names (lora.find_target_modules);
    None = the model type's attention projections (lora.default_target_modules)."""
    if target_names is None:
        target_names = lora.default_target_modules(model)
    return lora.find_target_modules(model, target_names)


def apply_lora_to_model(model: nn.Module, r: int = 16, alpha: float | None = None,
                        target_modules: Sequence[str] | str | None = None,
                        dropout: float = 0.0) -> nn.Module:
    """Wrap the target layers in LoRA and freeze everything else (lora.apply_lora), in place.

    alpha None = 2 r; target_modules None = the model type's attention projections
    (GPT-2: c_attn and attn.c_proj). Returns the model.
    """
    return lora.apply_lora(model, target_modules, r=r, alpha=2 * r if alpha is None else alpha,
                           dropout=dropout)


def get_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """[A, B] of every LoRA layer, in module order: 2 tensors per adapted layer."""
    return lora.lora_parameters(model)


def merge_lora_weights(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W0 += scaling * B @ A (lora.merge_lora)."""
    return lora.merge_lora(model)


# -- Phase 2: data (prefalign.data) ------------------------------------------------------

def extract_prompt_and_response(text: str) -> tuple[str, str]:
    """An HH-RLHF transcript -> (prompt through the last "\\n\\nAssistant:", reply).

    The split is data.formats' HH rule. The reply is returned stripped, as the guide's
    test expects ("The answer is 4."); prefalign's training data keeps its leading space
    (" The answer is 4."), which tokenizes like generated text.
    """
    if not _looks_hh(text):
        raise DataError(f"not an HH-RLHF transcript (it must start with 'Human:' and contain "
                        f"{HH_ASSISTANT!r}): {text[:60]!r}")
    prompt, reply, _ = _split_hh(text, text)
    return prompt, reply.strip()


@dataclass(frozen=True)
class PreferenceExample:
    """One normalised pair (data.formats): the guide's dataset.examples[i]."""

    prompt: Any
    chosen: Any
    rejected: Any


class PreferenceDataset(Dataset):
    """A torch Dataset of tokenized preference pairs over prefalign's loader.

    source: anything data.sources.load_rows reads (a JSONL/Parquet/CSV file, a saved
    `datasets` folder, "Anthropic/hh-rlhf" when it is in the local hub cache, a list of
    rows); every row format of data.formats works, HH-RLHF transcripts included. Rows
    without a preference (chosen == rejected, an empty reply) are dropped, as in training.
    max_samples keeps the first N pairs left after that.

    dataset[i] -> chosen_input_ids, chosen_attention_mask, rejected_input_ids,
    rejected_attention_mask (each (max_length,) long, right-padded with the pad id) and
    prompt_length (the prompt's token count; the reply starts at that position in both
    sequences). A DataLoader stacks them into (B, max_length) batches.
    """

    def __init__(self, tokenizer: Any, source: Any = "Anthropic/hh-rlhf", split: str | None = None,
                 max_samples: int | None = None, max_length: int = 512,
                 max_prompt_length: int = 256) -> None:
        examples, self.report = normalize_rows(load_rows(source, split=split))
        self.report.require_kept(str(source))
        examples = examples[:max_samples]
        self.examples = [PreferenceExample(e["prompt"], e["chosen"], e["rejected"])
                         for e in examples]
        self.features, self.truncation = tokenize_preferences(
            examples, tokenizer, max_length, max_prompt_length)
        self.pad_token_id = tokenizer.pad_token_id
        self.max_length = max_length

    _extract_prompt_and_response = staticmethod(extract_prompt_and_response)

    def __len__(self) -> int:
        return len(self.features)

    def _padded(self, ids: list[int]) -> tuple[Tensor, Tensor]:
        pad = self.max_length - len(ids)
        return (torch.tensor(ids + [self.pad_token_id] * pad),
                torch.tensor([1] * len(ids) + [0] * pad))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        feature = self.features[index]
        prompt = feature["prompt_input_ids"]
        item = {"prompt_length": torch.tensor(len(prompt))}
        for side in ("chosen", "rejected"):
            ids, mask = self._padded(list(prompt) + list(feature[f"{side}_input_ids"]))
            item[f"{side}_input_ids"], item[f"{side}_attention_mask"] = ids, mask
        return item


# -- Phase 3: reward model (prefalign.models.reward, losses.bradley_terry_loss) ------------

def compute_preference_loss(chosen_rewards: Tensor, rejected_rewards: Tensor
                            ) -> tuple[Tensor, dict[str, float]]:
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected) (losses.bradley_terry_loss).

    chosen_rewards, rejected_rewards (B,). metrics, named as `prefalign reward` logs them:
    accuracy (share of pairs with r_chosen > r_rejected), rewards/chosen, rewards/rejected,
    margin.
    """
    loss = bradley_terry_loss(chosen_rewards, rejected_rewards).mean()
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return loss, {"accuracy": (chosen > rejected).float().mean().item(),
                  "rewards/chosen": chosen.mean().item(),
                  "rewards/rejected": rejected.mean().item(),
                  "margin": (chosen - rejected).mean().item()}


# -- Phase 4: DPO (prefalign.logprobs, losses.dpo_loss) --------------------------------

def compute_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                      prompt_lengths: Tensor | Sequence[int]) -> Tensor:
    """(B,) sum of log p(token | prefix) over each sequence's response tokens.

    input_ids, attention_mask (B, T); prompt_lengths (B,): prompt tokens per sequence,
    counted over real tokens, so left and right padding both work. The one log-prob routine,
    logprobs.completion_logps, does the work.
    """
    lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).reshape(-1, 1)
    response = position_ids_from_mask(attention_mask) >= lengths
    return completion_logps(model, input_ids, attention_mask, response).logps


def compute_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                     ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float = 0.1
                     ) -> tuple[Tensor, dict[str, float]]:
    """DPO (arXiv:2305.18290, Eq. 7), the mean over pairs of losses.dpo_loss:
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))). Every argument (B,).

    metrics, named as `prefalign dpo` logs them: rewards/chosen = beta * (pi_c - ref_c)
    (the chosen log-ratio times beta), rewards/rejected, rewards/margins,
    rewards/accuracies (share of pairs with the larger reward on chosen).
    """
    out = dpo_loss(PairLogps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                 ref_rejected_logps), LossParams(beta=beta))
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return out.losses.mean(), {"rewards/chosen": chosen.mean().item(),
                               "rewards/rejected": rejected.mean().item(),
                               "rewards/margins": (chosen - rejected).mean().item(),
                               "rewards/accuracies": (chosen > rejected).float().mean().item()}


# -- Phase 5: PPO (prefalign.rl) ----------------------------------------------------------

def compute_advantages(rewards: Tensor, values: Tensor, mask: Tensor | None = None,
                       gamma: float = 1.0, lam: float = 0.95, whiten: bool = False
                       ) -> tuple[Tensor, Tensor]:
    """GAE (arXiv:1506.02438, eq. 16) by rl.gae -> (advantages, returns), (B, T) each.

    rewards, values (B, T) per token; mask (B, T) True on response tokens (None = all).
    whiten=True normalises the advantages to mean 0 and variance 1 over the mask
    (masked.masked_whiten), as `prefalign ppo` does before its update; returns stay raw.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return (masked_whiten(advantages, mask) if whiten else advantages), returns
