"""Every training loss, as pure functions of tensors.

B is the batch (pairs for preference losses), T the tokens. `*_logps` is the sum of the
completion-token log-probs of one sequence, shape (B,); `token_logps` is per token, (B, T);
chosen comes before rejected; a mask is True = include.

The return convention, for every loss here: unreduced values with gradients, per example
(B,) for sequence losses and per token (B, T) for token losses (PPO, GRPO), plus detached
statistics for logging. The caller reduces: a (weighted) mean over examples
(`weighted_mean`), or a masked mean over tokens (`masked.masked_mean`); GRPO's token
losses by the named reductions of `GRPO_LOSS_TYPES` (TRL's `loss_type`). `nll_loss` alone
returns the token mean itself, the one reduction every caller of it wants.

Formulas and reward definitions follow TRL 1.16 (DPOTrainer, experimental CPOTrainer and
ORPOTrainer, KTOTrainer, RewardTrainer, GRPOTrainer, RLOOTrainer). Each deliberate
difference is stated in the docstring of the function concerned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from prefalign.masked import masked_mean
from prefalign.rl import kl_estimate


@dataclass(frozen=True)
class PairLogps:
    """Log-probs of B preference pairs, every field (B,).

    chosen, rejected: policy sums of completion-token log-probs.
    ref_chosen, ref_rejected: the same under the reference model; None for reference-free
        losses. The losses detach them.
    chosen_lengths, rejected_lengths: completion token counts (float); needed by the losses
        that work on per-token averages (ipo, simpo, orpo).
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the preference losses.

    beta: float, or a (B,) tensor giving each row its own beta (multi-objective DPO, where
        each data source has its own beta). For ORPO it is the weight lambda of the odds
        ratio term; for IPO the regulariser tau.
    label_smoothing: assumed probability that a label is flipped: cDPO for `dpo` and
        `simpo`, the noise rate for `robust`; other losses reject a non-zero value.
    simpo_gamma: SimPO's target reward margin gamma.
    """

    beta: float | Tensor = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.beta, Tensor):
            if self.beta.ndim > 1:
                raise ValueError(f"beta must be a float or (B,), got {tuple(self.beta.shape)}")
        elif not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5], got {self.label_smoothing}")


@dataclass(frozen=True)
class PairLoss:
    """losses (B,) with gradients; chosen_rewards, rejected_rewards (B,) detached.

    stats: further detached (B,) statistics a loss reports, logged as batch means under
    their key (ORPO: log_odds_chosen, log_odds_ratio, TRL's names); empty for most losses.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """A registered preference loss and the inputs it needs."""

    fn: Callable[[PairLogps, LossParams], PairLoss]
    reference_free: bool = False  # ignores ref_chosen / ref_rejected
    needs_lengths: bool = False  # reads chosen_lengths / rejected_lengths
    uses_label_smoothing: bool = False


def _beta(beta: float | Tensor, like: Tensor) -> float | Tensor:
    # A per-row beta follows the log-probs' dtype and device so that a (B,) beta gives the
    # same numbers as running each row with a float beta.
    if isinstance(beta, Tensor):
        return beta.to(dtype=like.dtype, device=like.device)
    return float(beta)


def _logratios(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """log pi(y|x) - log ref(y|x) for chosen and rejected, (B,) each."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError("this loss needs reference log-probs (ref_chosen, ref_rejected)")
    # The reference is a fixed target: detaching keeps gradients on the policy even if the
    # caller computed reference log-probs with autograd on.
    return logps.chosen - logps.ref_chosen.detach(), logps.rejected - logps.ref_rejected.detach()


def _beta_and_logratios(logps: PairLogps, params: LossParams
                        ) -> tuple[float | Tensor, Tensor, Tensor]:
    """What every reference-based loss starts from: beta and the two log-ratios (B,)."""
    return _beta(params.beta, logps.chosen), *_logratios(logps)


def _averages(logps: PairLogps, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token averages of (B,) sums; an empty completion counts as one token (as TRL's IPO)."""
    if logps.chosen_lengths is None or logps.rejected_lengths is None:
        raise ValueError("this loss needs chosen_lengths and rejected_lengths")
    chosen_n, rejected_n = logps.chosen_lengths.clamp(min=1), logps.rejected_lengths.clamp(min=1)
    return chosen / chosen_n, rejected / rejected_n


def _result(beta: float | Tensor, chosen: Tensor, rejected: Tensor, losses: Tensor) -> PairLoss:
    """PairLoss with rewards beta * chosen and beta * rejected, detached."""
    return PairLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z); equals -log sigmoid(z) when eps = 0."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def dpo_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """DPO (registry key `dpo`, alias `sigmoid`, TRL's name): Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, Eq. 7.

    h = (pi_c - ref_c) - (pi_r - ref_r)
    loss = -log sigmoid(beta * h)
    With label smoothing eps (conservative DPO, Mitchell 2023, "A note on DPO with noisy
    preferences and relationship to IPO"):
    loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    rewards = beta * (pi - ref)

    Differs from TRL 1.16 for eps > 0 only: its "sigmoid" ignores label_smoothing (it reserves
    it for "robust" and "exo_pair"); earlier DPOTrainer versions and its CPOTrainer apply cDPO
    as here. With eps = 0 the two are identical.
    """
    beta, chosen, rejected = _beta_and_logratios(logps, params)
    losses = _smoothed_logistic(beta * (chosen - rejected), params.label_smoothing)
    return _result(beta, chosen, rejected, losses)


def robust_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """Robust DPO: Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409.

    With flip rate eps in [0, 0.5), h as in DPO:
    loss = ((1 - eps) * -log sigmoid(beta * h) - eps * -log sigmoid(-beta * h)) / (1 - 2 eps)
    rewards = beta * (pi - ref)
    The loss is an unbiased estimate of the clean DPO loss; it can be negative.
    """
    eps = params.label_smoothing
    if eps >= 0.5:
        raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {eps}")
    beta, chosen, rejected = _beta_and_logratios(logps, params)
    z = beta * (chosen - rejected)
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _result(beta, chosen, rejected, losses)


def hinge_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """SLiC-HF calibration loss: Zhao et al. 2023, arXiv:2305.10425, in TRL's form.

    loss = max(0, 1 - beta * h), h as in DPO (a hinge on the reference-relative margin with
    margin delta = 1/beta, scaled by beta); rewards = beta * (pi - ref).
    """
    beta, chosen, rejected = _beta_and_logratios(logps, params)
    losses = torch.relu(1 - beta * (chosen - rejected))
    return _result(beta, chosen, rejected, losses)


def ipo_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", arXiv:2310.12036, Eq. 17, with tau = beta.

    h = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|     (|y| = completion tokens, >= 1)
    loss = (h - 1 / (2 beta))^2
    rewards = beta * (pi - ref)   (sums, not averages, as TRL)

    The per-token normalisation is TRL 1.16's (confirmed there with the IPO authors): with
    summed log-probs the squared loss would grow with completion length.
    """
    beta, chosen, rejected = _beta_and_logratios(logps, params)
    chosen_avg, rejected_avg = _averages(logps, chosen, rejected)
    losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    return _result(beta, chosen, rejected, losses)


def sppo_hard_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """SPPO with hard labels: Wu et al. 2024, "Self-Play Preference Optimization",
    arXiv:2405.00675, Eq. 4.7 with P(chosen wins) = 1 and P(rejected wins) = 0, eta = 1/beta.

    loss = (pi_c - ref_c - 1/(2 beta))^2 + (pi_r - ref_r + 1/(2 beta))^2
    rewards = beta * (pi - ref)
    """
    beta, chosen, rejected = _beta_and_logratios(logps, params)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return _result(beta, chosen, rejected, losses)


def nca_pair_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """NCA: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv:2402.05369, pairwise form.

    r = beta * (pi - ref)
    loss = -log sigmoid(r_c) - 0.5 log sigmoid(-r_c) - 0.5 log sigmoid(-r_r)
    """
    beta, chosen, rejected = _beta_and_logratios(logps, params)
    r_c, r_r = beta * chosen, beta * rejected
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return _result(beta, chosen, rejected, losses)


def bco_pair_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """BCO: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv:2404.04656, pairwise form.

    r = beta * (pi - ref);  loss = -log sigmoid(r_c) - log sigmoid(-r_r)
    As in TRL 1.16, the paper's reward shift delta (a running mean of rewards) is omitted,
    which keeps the loss a function of the batch alone.
    """
    beta, chosen, rejected = _beta_and_logratios(logps, params)
    losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    return _result(beta, chosen, rejected, losses)


def apo_zero_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """APO-zero: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and
    Contrastive Revisions", arXiv:2408.06266, Eq. 7 (chosen better than the model's outputs).

    r = beta * (pi - ref);  loss = (1 - sigmoid(r_c)) + sigmoid(r_r)
    1 - sigmoid(x) is computed as sigmoid(-x): the same value without cancellation.
    """
    beta, chosen, rejected = _beta_and_logratios(logps, params)
    losses = torch.sigmoid(-beta * chosen) + torch.sigmoid(beta * rejected)
    return _result(beta, chosen, rejected, losses)


def apo_down_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """APO-down: D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8 (chosen worse than the
    model's outputs: lower both, the rejected more).

    r = beta * (pi - ref);  loss = sigmoid(r_c) + (1 - sigmoid(r_c - r_r))
    """
    beta, chosen, rejected = _beta_and_logratios(logps, params)
    losses = torch.sigmoid(beta * chosen) + torch.sigmoid(-beta * (chosen - rejected))
    return _result(beta, chosen, rejected, losses)


def simpo_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv:2405.14734, Eq. 6; reference-free.

    z = beta * pi_c / |y_c| - beta * pi_r / |y_r| - gamma
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)     (eps = label smoothing)
    rewards = beta * pi / |y|
    TRL 1.16 (CPOTrainer, loss_type="simpo") writes z as beta * (avg_c - avg_r - gamma / beta),
    the same value. Differs only for an empty completion: TRL divides by 0, here by 1.
    """
    beta = _beta(params.beta, logps.chosen)
    chosen, rejected = _averages(logps, logps.chosen, logps.rejected)
    z = beta * (chosen - rejected) - params.simpo_gamma
    losses = _smoothed_logistic(z, params.label_smoothing)
    return _result(beta, chosen, rejected, losses)


# log_softmax in fp32 resolves log-probs only to about 1e-6 near 0 (its result is a
# difference of numbers of logit size), so capping average log-probs there loses nothing and
# keeps log(1 - p) finite when a completion's probability rounds to 1.
_ORPO_MAX_AVG_LOGP = -1e-6


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 (Maechler 2012): expm1 near 0, log1p far from it."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(logps: PairLogps, params: LossParams) -> PairLoss:
    """ORPO odds-ratio term: Hong et al. 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model", arXiv:2403.07691, Eqs. 4 and 7; reference-free.

    a = pi / |y| (average log-prob), log odds(y) = a - log(1 - exp(a))
    z = log odds(y_c) - log odds(y_r)
    loss = -lambda * log sigmoid(z),  lambda = beta
    rewards = beta * a;  stats: log_odds_chosen = z, log_odds_ratio = log sigmoid(z)
    The full ORPO objective (Eq. 6) adds the NLL of the chosen sequence: the caller mixes in
    `nll_loss` (weight 1), over prompt and chosen completion tokens as TRL's ORPOTrainer
    does (the paper's Eq. 2 averages over completion tokens only: DPOConfig.nll_tokens).
    Computed in at least fp32, as TRL.

    Differences from TRL 1.16: TRL returns +beta * log sigmoid(...) and subtracts it; here the
    loss is positive so the caller adds it like any other loss. Average log-probs above -1e-6
    are capped there: TRL's value becomes inf/nan when one rounds to 0.
    """
    beta = _beta(params.beta, logps.chosen)
    dtype = torch.promote_types(logps.chosen.dtype, torch.float32)
    chosen, rejected = _averages(logps, logps.chosen.to(dtype), logps.rejected.to(dtype))
    capped_c = chosen.clamp(max=_ORPO_MAX_AVG_LOGP)
    capped_r = rejected.clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds = (capped_c - capped_r) - (_log1mexp(capped_c) - _log1mexp(capped_r))
    ratio = F.logsigmoid(log_odds)
    result = _result(beta, chosen, rejected, -beta * ratio)
    stats = {"log_odds_chosen": log_odds.detach(), "log_odds_ratio": ratio.detach()}
    return PairLoss(result.losses, result.chosen_rewards, result.rejected_rewards, stats)


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, uses_label_smoothing=True),
    "robust": LossSpec(robust_loss, uses_label_smoothing=True),
    "hinge": LossSpec(hinge_loss),
    "ipo": LossSpec(ipo_loss, needs_lengths=True),
    "sppo_hard": LossSpec(sppo_hard_loss),
    "nca_pair": LossSpec(nca_pair_loss),
    "bco_pair": LossSpec(bco_pair_loss),
    "apo_zero": LossSpec(apo_zero_loss),
    "apo_down": LossSpec(apo_down_loss),
    "simpo": LossSpec(
        simpo_loss, reference_free=True, needs_lengths=True, uses_label_smoothing=True
    ),
    "orpo": LossSpec(orpo_loss, reference_free=True, needs_lengths=True),
}
PREFERENCE_LOSS_NAMES: tuple[str, ...] = tuple(PREFERENCE_LOSSES)
# Further names accepted for a registered loss: TRL's DPOTrainer calls DPO "sigmoid".
PREFERENCE_LOSS_ALIASES: dict[str, str] = {"sigmoid": "dpo"}
# What --loss-type and YAML accept; "sigmoid" first, as it is the option's default (the
# name existing runs' config.yaml files hold, so that they still resume).
PREFERENCE_LOSS_CHOICES: tuple[str, ...] = (*PREFERENCE_LOSS_ALIASES, *PREFERENCE_LOSS_NAMES)


def loss_spec(name: str) -> LossSpec:
    """The registered preference loss `name` (or an alias of one); ValueError listing the
    valid names otherwise."""
    spec = PREFERENCE_LOSSES.get(PREFERENCE_LOSS_ALIASES.get(name, name))
    if spec is None:
        raise ValueError(
            f"unknown preference loss {name!r}; valid names: {', '.join(PREFERENCE_LOSS_NAMES)} "
            f"(aliases: {', '.join(f'{a} = {n}' for a, n in PREFERENCE_LOSS_ALIASES.items())})"
        )
    return spec


def preference_loss(name: str, logps: PairLogps, params: LossParams) -> PairLoss:
    """Run the registered preference loss `name`; per-example losses and rewards, (B,) each."""
    spec = loss_spec(name)
    # A smoothing value the loss would silently ignore is a configuration mistake.
    if params.label_smoothing and not spec.uses_label_smoothing:
        users = [n for n, s in PREFERENCE_LOSSES.items() if s.uses_label_smoothing]
        raise ValueError(
            f"label_smoothing has no effect on loss {name!r}; it applies to: {', '.join(users)}"
        )
    return spec.fn(logps, params)


def weighted_mean(losses: Tensor, weight: Tensor | None) -> Tensor:
    """The mean of per-row losses, each row counting `weight` times (weight 2 = the row
    repeated); None = plain mean."""
    if weight is None:
        return losses.mean()
    weight = weight.to(losses)
    return (losses * weight).sum() / weight.sum().clamp(min=1e-12)


def nll_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Negative log-likelihood, averaged over the masked tokens of the whole batch.

    token_logps (B, T), mask (B, T) True = include. loss = -sum(logp * mask) / sum(mask): a
    token mean over the batch, like TRL's SFT term in DPOTrainer (loss_type "sft") and the
    cross-entropy NLL term of CPOTrainer (completion tokens) and ORPOTrainer (prompt and
    completion tokens): the caller's mask decides which. Scalar; 0 when the mask is empty
    (TRL gives nan).
    """
    # masked_mean excludes with where(): a -inf at an excluded position cannot become nan.
    return -masked_mean(token_logps, mask)


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO reference point z0 of Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7.

    policy_kl_logps, ref_kl_logps (B,): log-probs of mismatched (prompt, completion) pairs.
    z0 = max(0, mean(policy_kl_logps - ref_kl_logps)), detached scalar, as TRL 1.16.
    Under data parallelism pass the tensors gathered from all processes: TRL averages the
    per-process means before clamping, which equals the mean of the gathered values for
    equal per-process batch sizes.
    """
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: Tensor,
    beta: float | Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", arXiv:2402.01306, Eq. 7.

    policy_logps, ref_logps (B,); labels (B,) bool, True = desirable; kl = z0 from
    `kto_kl_estimate` (scalar, detached, >= 0); beta float or (B,).
    r = pi - ref
    desirable:   loss = desirable_weight   * (1 - sigmoid(beta * (r - z0)))
    undesirable: loss = undesirable_weight * (1 - sigmoid(beta * (z0 - r)))
    rewards = beta * r (detached). Returns (losses (B,), rewards (B,)).

    Losses stay in row order; TRL puts desirable rows before undesirable ones, which changes
    the order but not the mean, and like TRL the caller's mean runs over all B rows (weights
    are not renormalised). 1 - sigmoid(x) is computed as sigmoid(-x).
    """
    beta = _beta(beta, policy_logps)
    logratios = policy_logps - ref_logps.detach()
    # z0 is a baseline estimated without gradients (the paper does not backpropagate it).
    kl = kl.detach()
    desirable = desirable_weight * torch.sigmoid(beta * (kl - logratios))
    undesirable = undesirable_weight * torch.sigmoid(beta * (logratios - kl))
    losses = torch.where(labels.bool(), desirable, undesirable)
    return losses, (beta * logratios).detach()


def bradley_terry_loss(
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    margin: Tensor | float | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, arXiv:2203.02155, Eq. 1), with the
    Llama 2 margin (Touvron et al. 2023, arXiv:2307.09288, Eq. 2) and reward centring
    (Eisenstein et al. 2023, arXiv:2312.09244, Eq. 2).

    rewards_chosen, rewards_rejected (B,); margin (B,) or scalar or None.
    loss = -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2, per example (B,).
    TRL 1.16's RewardTrainer adds center_rewards_coefficient * mean((r_c + r_r)^2) to the
    mean of the first term: the same number as the caller's mean of these per-example values.
    """
    diff = rewards_chosen - rewards_rejected
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (rewards_chosen + rewards_rejected) ** 2
    return losses


def ppo_policy_loss(token_logps: Tensor, old_token_logps: Tensor, advantages: Tensor,
                    mask: Tensor, clip_range: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate objective as a loss: Schulman et al. 2017, "Proximal Policy
    Optimization Algorithms", arXiv:1707.06347, Eq. 7.

    token_logps, old_token_logps, advantages, mask (B, T).
    ratio = exp(logp - logp_old)
    loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
    Returns (loss_t (B, T), 0 off the mask; the caller takes the masked mean) and detached
    scalar stats over the masked tokens: clipfrac (share where the clipped term is the
    larger), approxkl = mean(0.5 * (logp - logp_old)^2), ratio (mean).
    """
    log_ratio = token_logps - old_token_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    losses = _masked(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": masked_mean(0.5 * log_ratio**2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return losses, stats


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   clip_range: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, the PPO2 baselines form (Dhariwal et al. 2017, OpenAI
    Baselines; used by Ouyang et al. 2022, arXiv:2203.02155, and TRL's PPOTrainer).

    values, old_values, returns, mask (B, T).
    V_clip = V_old + clip(V - V_old, -eps, eps)
    loss_t = 0.5 * max((V_t - R_t)^2, (V_clip,t - R_t)^2)
    Returns (loss_t (B, T), 0 off the mask; the caller takes the masked mean) and detached
    stats: clipfrac, the share of masked tokens where the clipped term is the larger.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    losses = _masked(0.5 * torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return losses, stats


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    # where(), not multiplication: an inf off the mask (e.g. a padded ratio) stays out.
    return torch.where(mask.bool(), values, torch.zeros_like(values))


# --- On-policy policy losses (GRPO family, RLOO) -------------------------------------------
# Formulas follow TRL 1.16's GRPOTrainer and RLOOTrainer `_compute_loss`; the reductions
# below are its `loss_type` aggregations.

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A), and the (detached, bool)
    clip masks, TRL's: low = ratio < 1 - eps with A < 0, high = ratio > 1 + eps_high with
    A > 0 (the tokens whose gradient the clip removes), region = either."""
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    losses = -torch.minimum(ratio * advantages, clipped * advantages)
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return losses, {"low": low, "high": high, "region": low | high}


def _stat_mean(x: Tensor, mask: Tensor) -> Tensor:
    # A (B, 1) statistic (sequence-level ratios) is one value per row, averaged over rows
    # as TRL does; a (B, T) one is a mean over the masked tokens.
    return x.float().mean() if x.shape[-1] == 1 else masked_mean(x.float(), mask)


def grpo_policy_loss(
    token_logps: Tensor, old_token_logps: Tensor, advantages: Tensor, mask: Tensor, *,
    epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
    ref_token_logps: Tensor | None = None, importance_sampling_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's per-token loss: Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, Eq. 3 (k3 KL:
    Eq. 4), with DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476, the decoupled
    epsilon_low / epsilon_high of its objective) and GSPO's sequence-level ratio s_i (Zheng
    et al. 2025, arXiv:2507.18071, the length-normalised sequence likelihood ratio).

    token_logps, old_token_logps, mask (B, T); advantages (B,) one per sequence, or (B, T);
    ref_token_logps (B, T), needed when beta != 0. The caller's mask decides what counts: a
    truncated completion is left out by passing its row all False.
    ratio_t = exp(logp_t - logp_old_t)                               ("token")
    ratio_t = exp(sum_t m_t (logp_t - logp_old_t) / max(sum_t m_t, 1))  ("sequence", GSPO)
    loss_t = -min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A)
             + beta * k3_t,   k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    epsilon_high None = epsilon (symmetric clip). Returns (loss_t (B, T), 0 off the mask; the
    caller reduces with a `GRPO_LOSS_TYPES` reduction) and detached scalar stats, TRL's
    names: clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean and, when
    beta != 0, kl (masked mean of k3). With logp = logp_old the ratio is exactly 1.
    Not built: TRL's other loss types (cispo, sapo, luspo, vespo), its two-sided `delta`
    clip and `use_bias_correction_kl`.
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; "
                         f"valid: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    if beta and ref_token_logps is None:
        raise ValueError("grpo_policy_loss: beta != 0 needs ref_token_logps")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = token_logps - old_token_logps.detach()
    if importance_sampling_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)
    high = epsilon if epsilon_high is None else epsilon_high
    losses, clips = _clipped_surrogate(torch.exp(log_ratio), advantages.detach(), epsilon, high)
    stats = {f"clip_ratio/{k}_mean": _stat_mean(v, mask) for k, v in clips.items()}
    if beta:
        kl = kl_estimate(token_logps, ref_token_logps.detach(), "k3")
        losses = losses + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    return _masked(torch.broadcast_to(losses, mask.shape), mask), stats


def grpo_sequence_mean(losses: Tensor, mask: Tensor, max_completion_length: int | None = None,
                       num_items: Tensor | float | None = None) -> Tensor:
    """`grpo` (Shao et al. 2024, arXiv:2402.03300, Eq. 3): each sequence's token mean, then the
    mean over sequences: mean_i (sum_t m_it l_it / max(sum_t m_it, 1))."""
    return masked_mean(losses, mask, dim=-1).mean()


def bnpo_token_mean(losses: Tensor, mask: Tensor, max_completion_length: int | None = None,
                    num_items: Tensor | float | None = None) -> Tensor:
    """`bnpo`: the token mean over this batch, sum(m * l) / max(sum(m), 1)."""
    return masked_mean(losses, mask)


def dr_grpo_constant(losses: Tensor, mask: Tensor, max_completion_length: int | None = None,
                     num_items: Tensor | float | None = None) -> Tensor:
    """`dr_grpo` (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783,
    its unbiased objective): the token sum over a constant, sum(m * l) / (B * max_len),
    max_len = max_completion_length."""
    if max_completion_length is None:
        raise ValueError("dr_grpo needs max_completion_length")
    return _masked(losses, mask).sum() / (losses.shape[0] * max_completion_length)


def dapo_token_sum(losses: Tensor, mask: Tensor, max_completion_length: int | None = None,
                   num_items: Tensor | float | None = None) -> Tensor:
    """`dapo` (Yu et al. 2025, arXiv:2503.14476, its token-level loss): sum(m * l) / N, N the
    masked tokens of the whole batch the update averages over (every process and every
    accumulated micro-batch: TRL's num_items_in_batch, rescaled to one step). num_items None
    = this batch's tokens, where dapo equals bnpo."""
    total = _masked(losses, mask).sum()
    count = mask.sum() if num_items is None else torch.as_tensor(num_items)
    return total / count.to(total).clamp(min=1)


# TRL's `loss_type` names: the reduction of grpo_policy_loss's (B, T) values to the loss.
GRPO_LOSS_TYPES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_sequence_mean, "bnpo": bnpo_token_mean,
    "dr_grpo": dr_grpo_constant, "dapo": dapo_token_sum,
}


def grpo_aggregate(loss_type: str, losses: Tensor, mask: Tensor,
                   max_completion_length: int | None = None,
                   num_items: Tensor | float | None = None) -> Tensor:
    """Reduce grpo_policy_loss's (B, T) values with the registered `loss_type`; a scalar."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; valid: {', '.join(GRPO_LOSS_TYPES)}")
    return GRPO_LOSS_TYPES[loss_type](losses, mask, max_completion_length, num_items)


def rloo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, *,
                     epsilon: float = 0.2, epsilon_high: float | None = None
                     ) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO's clipped sequence-level loss, as TRL 1.16's RLOOTrainer (Ahmadian et al. 2024,
    "Back to Basics", arXiv:2402.14740, with PPO's clip, Schulman et al. 2017, Eq. 7).

    logps, old_logps (B,): completion log-prob sums; advantages (B,), from
    `rl.rloo_advantages` (the KL penalty, if any, is already in the reward there).
    ratio = exp(logp - logp_old)   (of the whole sequence: a sum, not GSPO's mean)
    loss = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    Returns (losses (B,); the caller takes the mean) and detached scalar stats
    clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean (shares of rows).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps.detach())
    losses, clips = _clipped_surrogate(ratio, advantages.detach(), epsilon, high)
    return losses, {f"clip_ratio/{k}_mean": v.float().mean() for k, v in clips.items()}
