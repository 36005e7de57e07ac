"""Reinforcement-learning math: PPO's reward shaping, GAE, KL estimates and controllers, and
the critic-free advantages of GRPO, RLOO and REINFORCE++.

Pure functions of tensors; PPO's losses are in `losses`, masked statistics in `masked`.

Shapes: B sequences, T token positions. Per-token tensors are aligned with the tokens:
x[:, t] belongs to token t (its log-prob, its value V(state before t), its reward). `mask`
(B, T) is True on response tokens; everything else is ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.masked import Reduce, last_token_index, masked_var, masked_whiten

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


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor,
                       reduce: Reduce | None = None) -> Tensor:
    """1 - Var(R - V) / Var(R): 1 for a perfect critic, 0 for a constant one. `reduce`
    (masked.py): the variances of every process's tokens, as one process holding them all."""
    return 1 - (masked_var(returns - values, mask, reduce=reduce)
                / masked_var(returns, mask, reduce=reduce).clamp(min=1e-8))


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


# --- Critic-free advantages: GRPO, RLOO, REINFORCE++ --------------------------------------
# Rewards are (N,) for N = P * G completions, G consecutive rows per prompt. Under data
# parallelism pass every process's rewards (gathered, so no group is split) and keep your
# own rows of the result afterwards, as TRL does. A nan reward (no reward function scored
# the completion) is left out of its group's statistics and gets advantage 0, as in TRL.

SCALE_REWARDS = ("group", "batch", "none")
REWARD_STD_EPS = 1e-4  # TRL's: A = (r - mean) / (std + 1e-4)


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Standard deviation over the non-nan entries with Bessel's correction (TRL's `nanstd`);
    nan where fewer than two entries."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum() if dim is None else (~torch.isnan(x)).sum(dim)
    var = var * count / (count - 1)
    return torch.where(count > 1, var, torch.full_like(var, float("nan"))).sqrt()


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """(N,): the standard deviation of each row's group (0 for groups of one, as TRL)."""
    if group_size == 1:
        return torch.zeros_like(rewards)
    return nanstd(_groups(rewards, group_size), dim=1).repeat_interleave(group_size)


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group"
                     ) -> tuple[Tensor, Tensor]:
    """GRPO's group-relative advantages (Shao et al. 2024, arXiv:2402.03300, section 4.1.2,
    outcome supervision), with TRL 1.16's `scale_rewards`.

    rewards (N,), groups of `group_size` consecutive rows. A_i = r_i - mean(group of i), then
      group: / (std(group of i) + 1e-4)     (the paper's)
      batch: / (std(all N rewards) + 1e-4)  (Hu et al. 2025, PPO Lite, arXiv:2508.08221)
      none:  unscaled                        (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783)
    std is the Bessel-corrected one. Example, G = 3, rewards [1, 2, 3, 5, 5, 5]: group means
    2 and 5, stds 1 and 0; group: [-1/1.0001, 0, 1/1.0001, 0, 0, 0]; none: [-1, 0, 1, 0, 0, 0].
    Returns (advantages (N,), std (N,)): std is the one TRL tests against 0 for
    frac_reward_zero_std (the group's for group and none, the batch's for batch).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: {', '.join(SCALE_REWARDS)}")
    means = torch.nanmean(_groups(rewards, group_size), dim=1).repeat_interleave(group_size)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = group_reward_std(rewards, group_size)
    advantages = rewards - means
    if scale_rewards != "none":
        advantages = advantages / (std + REWARD_STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


def frac_reward_zero_std(std: Tensor) -> Tensor:
    """TRL's frac_reward_zero_std: the share of rows whose std (from group_advantages) is 0."""
    return torch.isclose(std, torch.zeros_like(std)).float().mean()


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic-sampling filter (Yu et al. 2025, arXiv:2503.14476, the constraint
    0 < |{correct o_i}| < G of its objective): (N,) bool, False on every row of a group whose
    rewards are all equal (their GRPO advantages are all 0: no gradient, only dilution).
    "Equal" is TRL's zero-std test, so 1 - mean(mask) is frac_reward_zero_std for group
    scaling. The caller drops the False rows (or refills the batch with new groups)."""
    std = group_reward_std(rewards, group_size)
    return ~torch.isclose(std, torch.zeros_like(std))


def kl_penalized_rewards(rewards: Tensor, old_token_logps: Tensor, ref_token_logps: Tensor,
                         mask: Tensor, beta: float) -> Tensor:
    """RLOO's KL in the reward, as TRL 1.16's RLOOTrainer: r - beta * sum_t m_t (old_t - ref_t)
    (k1 summed over the completion). rewards (N,); the log-probs and mask (N, T) -> (N,).
    TRL 1.16's RLOO has the KL in the reward only; a KL term in the loss is GRPO's beta."""
    kl = torch.where(mask.bool(), kl_estimate(old_token_logps, ref_token_logps, "k1"), 0.0)
    return rewards - beta * kl.sum(-1)


def rloo_advantages(rewards: Tensor, group_size: int, normalize: bool = False) -> Tensor:
    """RLOO's leave-one-out baseline (Ahmadian et al. 2024, arXiv:2402.14740, the RLOO estimator;
    Kool et al. 2019), as TRL 1.16's RLOOTrainer.

    rewards (N,) (KL already subtracted, see kl_penalized_rewards), groups of G >= 2:
    A_i = r_i - (sum_{j in group, j != i} r_j) / (G - 1)   (nan rewards left out of the sum
    and of G). Example, G = 3, rewards [1, 2, 6]: baselines [4, 3.5, 1.5], A [-3, -1.5, 4.5].
    normalize: then (A - mean(A)) / (std(A) + 1e-4) over all N (TRL's normalize_advantages).
    G = 1 gives 0. Returns (N,).
    """
    grouped = _groups(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    counts = (~torch.isnan(grouped)).sum(1, keepdim=True)
    baselines = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (counts - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + REWARD_STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{i >= t, on the mask} gamma^(i - t) r_i over each row's masked positions;
    (B, T), 0 off the mask. GAE with V = 0 and lam = 1 is exactly this recursion."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)[0]


def reinforce_pp_advantages(scores: Tensor, old_token_logps: Tensor, ref_token_logps: Tensor,
                            mask: Tensor, kl_coef: float, gamma: float = 1.0,
                            kl_estimator: str = "k1", reduce: Reduce | None = None
                            ) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262, section 3): token-level KL-shaped rewards,
    discounted returns, advantages whitened over the global batch; no critic.

    scores (B,); old_token_logps, ref_token_logps, mask (B, T).
    r_t = score * [t = last] - kl_coef * KL_t,   KL_t = log pi_old(t) - log ref(t) (k1)
    G_t = sum_{i >= t} gamma^(i - t) r_i
    A_t = (G_t - mean(G)) / sqrt(var(G) + 1e-8), mean and (unbiased) var over every masked
    token of every process when `reduce` is given (`masked.masked_whiten`).
    Returns (advantages, returns), both (B, T) and 0 off the mask.
    """
    kl = kl_estimate(old_token_logps, ref_token_logps, kl_estimator)
    returns = discounted_returns(shaped_rewards(scores, kl, mask, kl_coef), mask, gamma)
    return masked_whiten(returns, mask, reduce=reduce), returns
