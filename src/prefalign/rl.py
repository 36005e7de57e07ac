"""Reinforcement-learning math: PPO's reward shaping, GAE, KL estimates and controllers.

Pure functions of tensors; PPO's losses are in `losses`, masked statistics in `masked`.

Shapes: B sequences, T token positions. Per-token tensors are aligned with the tokens:
x[:, t] belongs to token t (its log-prob, its value V(state before t), its reward). `mask`
(B, T) is True on response tokens; everything else is ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.masked import last_token_index, masked_var

KL_ESTIMATORS = ("k1", "k3")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    Schulman 2020, "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html):
    with log r = ref - logp,  k1 = -log r = logp - ref (unbiased, can be negative);
    k3 = (r - 1) - log r (unbiased, always >= 0, lower variance).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: -kl_coef * KL on every response token, plus the score on the last.

    Ziegler et al. 2019, arXiv:1909.08593, eq. 2: R(x, y) = r(x, y) - beta * log(pi/ref).
    scores (B,), kl (B, T), mask (B, T) -> (B, T).
    """
    rewards = -kl_coef * kl * mask
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};
    the value after the last response token is 0 (the episode ends there). Positions
    outside the mask are skipped, so left padding inside the window is harmless.
    Returns (advantages, returns = advantages + values), both (B, T), zero off the mask.
    """
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # Off-mask positions pass the running values through unchanged.
        next_value = torch.where(m.bool(), values[:, t], next_value)
        next_advantage = torch.where(m.bool(), advantage, next_advantage)
    return advantages, (advantages + values) * mask


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R): 1 for a perfect critic, 0 for a constant one."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv:1909.08593, section 2.2): steer the KL coefficient so the
    measured KL tracks a target.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient with the adaptive controller's interface."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
