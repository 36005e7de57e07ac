"""The on-policy math (GRPO family, RLOO, REINFORCE++) against TRL 1.16's trainers and by hand.

The oracles call TRL's real `_compute_loss`: the trainer object is built without __init__
and given only the attributes that method reads; its log-prob routine returns our tensors.
"""

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefalign.losses import GRPO_LOSS_TYPES, grpo_aggregate, grpo_policy_loss, rloo_policy_loss
from prefalign.masked import masked_whiten
from prefalign.rl import (
    discounted_returns,
    frac_reward_zero_std,
    group_advantages,
    informative_groups,
    kl_penalized_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)

trl = pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.rloo_trainer import RLOOTrainer  # noqa: E402

B, T, MAX_LEN = 6, 5, 7


class OneProcess:
    """The accelerator calls `_compute_loss` makes, for a single process."""

    num_processes = 1

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def rollout(seed=4):
    """Per-token log-probs far enough from the old ones to clip, a truncated row (all
    False: left out by its mask), short rows, and garbage off the mask."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logps = old + torch.randn(B, T, generator=g) * 0.4
    ref = old + torch.randn(B, T, generator=g) * 0.3
    lengths = torch.tensor([5, 3, 0, 1, 4, 5])
    mask = torch.arange(T) < lengths[:, None]
    logps = torch.where(mask, logps, torch.full_like(logps, -7.0))
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.0, 0.9])
    return logps, old, ref, advantages, mask


def trainer(cls, **attrs):
    obj = object.__new__(cls)
    obj.__dict__.update(aux_loss_enabled=False, model=SimpleNamespace(training=True),
                        accelerator=OneProcess(),
                        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, **attrs)
    return obj


def trl_grpo(logps, old, ref, advantages, mask, loss_type, beta, eps_high, level):
    obj = trainer(GRPOTrainer, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                  importance_sampling_level=level, beta=beta, loss_type=loss_type,
                  epsilon_low=0.2, epsilon_high=0.2 if eps_high is None else eps_high,
                  use_vllm=False, vllm_importance_sampling_correction=False,
                  current_gradient_accumulation_steps=1, max_completion_length=MAX_LEN,
                  _entropy_bonus_enabled=False,
                  args=SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                       steps_per_generation=1))
    obj._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    m = mask.long()
    inputs = {"prompt_ids": torch.ones(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": m,
              "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": m.sum()}
    loss = obj._compute_loss(None, inputs)
    return loss, {k: v[0] for k, v in obj._metrics["train"].items()}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", sorted(GRPO_LOSS_TYPES))
def test_grpo_loss_and_gradient_equal_trl(loss_type, beta, eps_high, level):
    logps, old, ref, advantages, mask = rollout()
    ours_in = logps.clone().requires_grad_()
    losses, stats = grpo_policy_loss(ours_in, old, advantages, mask, epsilon=0.2,
                                     epsilon_high=eps_high, beta=beta, ref_token_logps=ref,
                                     importance_sampling_level=level)
    ours = grpo_aggregate(loss_type, losses, mask, MAX_LEN, num_items=mask.sum())
    ours.backward()
    trl_in = logps.clone().requires_grad_()
    theirs, metrics = trl_grpo(trl_in, old, ref, advantages, mask.float(), loss_type, beta,
                               eps_high, level)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert ours_in.grad.abs().sum() > 0
    torch.testing.assert_close(ours_in.grad, trl_in.grad, atol=1e-5, rtol=0)
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    for name in names + (["kl"] if beta else []):
        assert abs(stats[name].item() - metrics[name]) < 1e-5, name
    assert ("kl" in stats) == bool(beta)
    # The example must exercise both clips, or the comparison proves little.
    assert stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0


def test_dapo_divides_by_the_whole_batchs_tokens():
    logps, old, _, advantages, mask = rollout()
    losses, _ = grpo_policy_loss(logps, old, advantages, mask)
    total = torch.where(mask, losses, 0.0).sum()
    torch.testing.assert_close(grpo_aggregate("dapo", losses, mask, num_items=40), total / 40)
    torch.testing.assert_close(grpo_aggregate("dapo", losses, mask),
                               grpo_aggregate("bnpo", losses, mask))
    with pytest.raises(ValueError, match="valid: grpo, bnpo, dr_grpo, dapo"):
        grpo_aggregate("gspo", losses, mask)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_aggregate("dr_grpo", losses, mask)


def test_rloo_loss_and_gradient_equal_trl():
    logps, old, _, advantages, mask = rollout()
    old_logps = torch.where(mask, old, 0.0).sum(1)
    ours_in = logps.clone().requires_grad_()
    seq = torch.where(mask, ours_in, 0.0).sum(1)
    losses, stats = rloo_policy_loss(seq, old_logps, advantages, epsilon=0.2, epsilon_high=0.28)
    losses.mean().backward()
    obj = trainer(RLOOTrainer, epsilon_low=0.2, epsilon_high=0.28)
    trl_in = logps.clone().requires_grad_()
    obj._get_per_token_logps_and_entropies = lambda *a, **k: (trl_in, torch.zeros_like(trl_in), None)
    inputs = {"prompt_ids": torch.ones(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.ones(B, T, dtype=torch.long),
              "completion_mask": mask.long(), "old_logps": old_logps, "advantages": advantages}
    theirs = obj._compute_loss(None, inputs)
    theirs.backward()
    assert abs(losses.mean().item() - theirs.item()) < 1e-5
    torch.testing.assert_close(ours_in.grad, trl_in.grad, atol=1e-5, rtol=0)
    for name, value in stats.items():
        assert abs(value.item() - obj._metrics["train"][name][0]) < 1e-5, name
    assert stats["clip_ratio/region_mean"] > 0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ratio_is_one_on_the_first_update(level):
    _, old, ref, advantages, mask = rollout()
    logps = old.clone().requires_grad_()
    losses, stats = grpo_policy_loss(logps, old, advantages * 50, mask, epsilon_high=0.28,
                                     importance_sampling_level=level)
    # ratio exactly 1: each masked token's loss is exactly -A, nothing is clipped.
    assert torch.equal(losses, torch.where(mask, -advantages[:, None] * 50, 0.0))
    assert all(v.item() == 0 for v in stats.values())
    seq, old_seq = torch.where(mask, old, 0.0).sum(1), torch.where(mask, old, 0.0).sum(1)
    rloo_losses, rloo_stats = rloo_policy_loss(seq, old_seq, advantages * 50)
    assert torch.equal(rloo_losses, -advantages * 50)
    assert all(v.item() == 0 for v in rloo_stats.values())


def test_grpo_loss_refuses_bad_arguments():
    logps, old, _, advantages, mask = rollout()
    with pytest.raises(ValueError, match="token, sequence"):
        grpo_policy_loss(logps, old, advantages, mask, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="ref_token_logps"):
        grpo_policy_loss(logps, old, advantages, mask, beta=0.1)


def test_group_advantages_by_hand():
    """Two groups of G = 3: [1, 2, 3] (mean 2, std sqrt((1 + 0 + 1) / 2) = 1) and [5, 5, 5]
    (mean 5, std 0); over the batch: mean 3.5, std sqrt(15.5 / 5)."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, std = group_advantages(rewards, 3, "group")
    torch.testing.assert_close(adv, torch.tensor([-1, 0, 1, 0, 0, 0]) / 1.0001)
    torch.testing.assert_close(std, torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert frac_reward_zero_std(std).item() == 0.5
    adv, std = group_advantages(rewards, 3, "none")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0, 1, 0, 0, 0]))
    assert frac_reward_zero_std(std).item() == 0.5
    adv, std = group_advantages(rewards, 3, "batch")
    batch_std = math.sqrt(15.5 / 5)
    torch.testing.assert_close(adv, torch.tensor([-1, 0, 1, 0, 0, 0]) / (batch_std + 1e-4))
    torch.testing.assert_close(std, torch.full((6,), batch_std))
    assert frac_reward_zero_std(std).item() == 0.0
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(rewards, 3, "global")
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


def test_unscored_completion_is_left_out_of_its_group():
    """[1, nan, 3]: mean 2, std sqrt(2) over the two scored rows; the nan row gets 0."""
    rewards = torch.tensor([1.0, float("nan"), 3.0])
    adv, _ = group_advantages(rewards, 3)
    torch.testing.assert_close(adv, torch.tensor([-1, 0, 1]) / (math.sqrt(2) + 1e-4))
    # Leave-one-out over the scored siblings: 1 - 3 = -2 and 3 - 1 = 2.
    torch.testing.assert_close(rloo_advantages(rewards, 3), torch.tensor([-2.0, 0, 2]))


def test_zero_std_filter():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    keep = informative_groups(rewards, 3)
    assert keep.tolist() == [True] * 3 + [False] * 6
    _, std = group_advantages(rewards, 3)
    assert frac_reward_zero_std(std).item() == pytest.approx(1 - keep.float().mean().item())


def test_rloo_leave_one_out_by_hand():
    """[1, 2, 6]: baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5."""
    rewards = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 1.0])
    adv = rloo_advantages(rewards, 3)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, 1.5, 1.5, -3.0]))
    std = statistics.stdev(adv.tolist())  # Bessel-corrected, mean 0
    torch.testing.assert_close(rloo_advantages(rewards, 3, normalize=True), adv / (std + 1e-4))
    assert rloo_advantages(rewards, 1).abs().sum() == 0


def test_rloo_kl_in_the_reward_by_hand():
    """k1 summed over the completion: (-1 + 1.5) + (-2 + 2.5) = 1; the padded token is out."""
    old = torch.tensor([[-1.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -2.5, 0.0]])
    mask = torch.tensor([[True, True, False]])
    out = kl_penalized_rewards(torch.tensor([3.0]), old, ref, mask, beta=0.1)
    torch.testing.assert_close(out, torch.tensor([3.0 - 0.1 * 1.0]))


def test_discounted_returns_skip_padding():
    """gamma = 0.5, left padding at t = 0: G_3 = 4, G_2 = 2 + 0.5 * 4 = 4, G_1 = 1 + 0.5 * 4 = 3."""
    rewards = torch.tensor([[9.0, 1.0, 2.0, 4.0]])
    mask = torch.tensor([[False, True, True, True]])
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5),
                               torch.tensor([[0.0, 3.0, 4.0, 4.0]]))


def test_reinforce_pp_by_hand():
    """score 1, k1 = old - ref = [0.5, 0, -0.5], kl_coef 0.1: r = [-0.05, 0, -(-0.05) + 1];
    gamma 0.5: G = [-0.05 + 0.5 * 0.525, 0 + 0.5 * 1.05, 1.05] = [0.2125, 0.525, 1.05]."""
    old = torch.tensor([[-1.0, -1.0, -1.0, -3.0], [-2.0, -2.0, -5.0, -5.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-2.0, -2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    scores = torch.tensor([1.0, -1.0])  # row 2: no KL, G = [-0.5, -1]
    adv, returns = reinforce_pp_advantages(scores, old, ref, mask, kl_coef=0.1, gamma=0.5)
    expected = [0.2125, 0.525, 1.05, -0.5, -1.0]
    torch.testing.assert_close(returns[mask], torch.tensor(expected))
    assert returns[~mask].abs().sum() == 0 and adv[~mask].abs().sum() == 0
    mean, var = statistics.mean(expected), statistics.variance(expected)
    whitened = [(g - mean) / math.sqrt(var + 1e-8) for g in expected]
    torch.testing.assert_close(adv[mask], torch.tensor(whitened))


def test_reinforce_pp_normalises_over_every_process():
    """A `reduce` summing over two processes holding the same rows gives the statistics of
    the rows twice over (the unbiased variance changes with the count)."""
    g = torch.Generator().manual_seed(3)
    old, ref = -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]]).bool()
    scores = torch.tensor([0.3, -1.0, 2.0])
    adv, returns = reinforce_pp_advantages(scores, old, ref, mask, 0.05, 0.9,
                                           reduce=lambda t: 2 * t)
    both = masked_whiten(torch.cat([returns, returns]), torch.cat([mask, mask]))
    torch.testing.assert_close(adv, both[:3])
    local, _ = reinforce_pp_advantages(scores, old, ref, mask, 0.05, 0.9)
    assert not torch.allclose(adv, local)
