"""The modules PPO trains: the policy plus a value head, on a shared or separate backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prefalign.logprobs import CompletionLogps, completion_logps, position_ids_from_mask
from prefalign.models.reward import init_reward_model

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """A small MLP hidden -> hidden -> 1 reading each position's hidden state.

    The last layer starts at zero, so the first value estimates are 0 and the critic's
    early errors do not swamp the advantages.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1)


def _aligned(values: Tensor) -> Tensor:
    """Value of the state before token t sits at t, like token_logps: shift right by one."""
    return torch.nn.functional.pad(values[:, :-1], (1, 0))


class PolicyWithValue(nn.Module):
    """policy (a causal LM) + value head; `critic` is a separate backbone, or None to share
    the policy's. forward -> (CompletionLogps of the policy, values (B, T) aligned to tokens).
    """

    def __init__(self, policy: nn.Module, value_head: ValueHead,
                 critic: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                temperature: float = 1.0, stats: bool = False,
                chunk_size: int | None = None) -> tuple[CompletionLogps, Tensor]:
        out = completion_logps(self.policy, input_ids, attention_mask, completion_mask,
                               temperature=temperature, stats=stats, chunk_size=chunk_size,
                               return_hidden=self.critic is None)
        if self.critic is None:
            hidden = out.hidden_states
            out.hidden_states = None
        else:
            hidden = self.critic(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids_from_mask(attention_mask),
                                 use_cache=False).last_hidden_state
        return out, _aligned(self.value_head(hidden))


def critic_backbone(model_dir: str) -> nn.Module:
    """The transformer of a reward model, causal LM or adapter directory, without its head:
    the critic reads hidden states through its own new ValueHead, so no score head is used
    (a classification directory that is not a reward model is still refused)."""
    return init_reward_model(model_dir).backbone


def save_value_head(head: ValueHead, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(directory / VALUE_HEAD_FILE))


def load_value_head(directory: Path, hidden_size: int) -> ValueHead:
    head = ValueHead(hidden_size)
    head.load_state_dict(load_file(str(directory / VALUE_HEAD_FILE)))
    return head
