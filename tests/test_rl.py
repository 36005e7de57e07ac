"""PPO math against hand-written values (the arithmetic is in each docstring)."""

import math

import pytest
import torch

from prefalign.losses import ppo_policy_loss, ppo_value_loss
from prefalign.masked import last_token_index, masked_whiten
from prefalign.rl import (
    AdaptiveKLController,
    explained_variance,
    gae,
    kl_estimate,
    shaped_rewards,
)

T = torch.tensor


def test_gae_hand_computed():
    """r = [0, 0, 1], V = [0.5, 0.2, 0.4], gamma 0.9, lambda 0.8 (gamma*lambda = 0.72):
    d2 = 1 - 0.4 = 0.6                 A2 = 0.6
    d1 = 0 + 0.9*0.4 - 0.2 = 0.16      A1 = 0.16 + 0.72*0.6 = 0.592
    d0 = 0 + 0.9*0.2 - 0.5 = -0.32     A0 = -0.32 + 0.72*0.592 = 0.10624
    returns = A + V = [0.60624, 0.792, 1.0]
    """
    adv, ret = gae(T([[0.0, 0, 1]]), T([[0.5, 0.2, 0.4]]), T([[True, True, True]]), 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx([0.10624, 0.592, 0.6])
    assert ret[0].tolist() == pytest.approx([0.60624, 0.792, 1.0])


def test_gae_gamma_lambda_one_is_return_minus_value():
    """gamma = lambda = 1: A_t = (sum of rewards from t) - V_t = [1-0.5, 1-0.2, 1-0.4]."""
    adv, _ = gae(T([[0.0, 0, 1]]), T([[0.5, 0.2, 0.4]]), T([[True, True, True]]), 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.8, 0.6])


def test_gae_skips_positions_outside_the_mask():
    """A prompt token before and padding after the response change nothing."""
    r, v = T([[9.0, 0, 0, 1, 7]]), T([[3.0, 0.5, 0.2, 0.4, 5]])
    mask = T([[False, True, True, True, False]])
    adv, ret = gae(r, v, mask, 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx([0, 0.10624, 0.592, 0.6, 0])
    assert ret[0, 0] == 0 and ret[0, 4] == 0


def test_shaped_rewards_put_score_on_last_response_token():
    """kl_coef 0.1, kl = [_, 1, 2, _] on tokens 1..2: rewards = [0, -0.1, -0.2 + 5, 0]."""
    mask = T([[False, True, True, False]])
    rewards = shaped_rewards(T([5.0]), T([[3.0, 1, 2, 3]]), mask, 0.1)
    assert rewards[0].tolist() == pytest.approx([0, -0.1, 4.8, 0])
    assert last_token_index(T([[True, True, False], [False, False, False]])).tolist() == [1, 0]


def test_kl_estimators():
    """logp = -1, ref = -2: k1 = 1; log r = -1, k3 = e^-1 - 1 + 1 = 0.367879."""
    assert kl_estimate(T([-1.0]), T([-2.0]), "k1").item() == pytest.approx(1.0)
    assert kl_estimate(T([-1.0]), T([-2.0]), "k3").item() == pytest.approx(math.exp(-1))
    assert kl_estimate(T([-2.0]), T([-1.0]), "k1").item() < 0 < kl_estimate(T([-2.0]), T([-1.0]), "k3").item()
    with pytest.raises(ValueError, match="k1, k3"):
        kl_estimate(T([0.0]), T([0.0]), "k9")


@pytest.mark.parametrize(
    "ratio, advantage, loss, clipped",
    [
        (1.5, 1.0, -1.2, 1.0),   # clipped high: max(-1.5, -1.2) = -1.2
        (0.5, -1.0, 0.8, 1.0),   # clipped low: max(0.5, 0.8) = 0.8
        (1.1, 1.0, -1.1, 0.0),   # inside the range: both terms equal -1.1
        (0.5, 1.0, -0.5, 0.0),   # below range with A > 0: pessimistic unclipped term -0.5
    ],
)
def test_clipped_policy_objective(ratio, advantage, loss, clipped):
    logp = T([[math.log(ratio)]])
    out, stats = ppo_policy_loss(logp, T([[0.0]]), T([[advantage]]), T([[True]]), 0.2)
    assert out.item() == pytest.approx(loss)
    assert stats["clipfrac"].item() == clipped
    assert stats["approxkl"].item() == pytest.approx(0.5 * math.log(ratio) ** 2)


def test_ratio_is_one_and_approxkl_zero_when_policy_unchanged():
    logp = torch.randn(2, 5)
    loss, stats = ppo_policy_loss(logp, logp.clone(), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool))
    assert stats["ratio"].item() == 1.0 and stats["approxkl"].item() == 0.0


def test_clipped_value_loss():
    """V = 1.5, V_old = 1.0, R = 2.0, eps 0.2: V_clip = 1.2; max(0.25, 0.64) / 2 = 0.32."""
    loss, stats = ppo_value_loss(T([[1.5]]), T([[1.0]]), T([[2.0]]), T([[True]]), 0.2)
    assert loss.item() == pytest.approx(0.32) and stats["clipfrac"].item() == 1.0


def test_masked_whiten():
    """x = [1, 2, 3, 4]: mean 2.5, unbiased var 5/3; (x - 2.5)/sqrt(5/3); masked entry -> 0."""
    x = T([[1.0, 2, 3, 4, 100]])
    mask = T([[True, True, True, True, False]])
    expected = [(v - 2.5) / math.sqrt(5 / 3) for v in (1, 2, 3, 4)] + [0]
    assert masked_whiten(x, mask)[0].tolist() == pytest.approx(expected, abs=1e-6)
    kept = masked_whiten(x, mask, shift_mean=False)[0, :4]
    assert kept.mean().item() == pytest.approx(2.5)


def test_explained_variance():
    returns, mask = T([[1.0, 2, 3]]), T([[True, True, True]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask).item() == pytest.approx(0.0)


def test_adaptive_kl_controller():
    """init 0.2, target 6, horizon 10000, 256 steps:
    KL 9 -> error clip(0.5) = 0.2 -> 0.2 * (1 + 0.2*256/10000) = 0.201024
    KL 3 -> error clip(-0.5) = -0.2 -> 0.2 * (1 - 0.00512) = 0.198976"""
    assert AdaptiveKLController(0.2, 6, 10000).update(9.0, 256) == pytest.approx(0.201024)
    assert AdaptiveKLController(0.2, 6, 10000).update(3.0, 256) == pytest.approx(0.198976)
    controller = AdaptiveKLController(0.2, 6, 10000)
    controller.update(6.0, 256)
    assert controller.value == pytest.approx(0.2)


def test_ppo_losses_are_per_token_and_zero_off_the_mask():
    """Tokens [a, b], b outside the mask (its advantage 7 and return 9 must not count).
    Unchanged policy (ratio 1), A = 2: policy loss_a = max(-2 * 1, -2 * 1) = -2.
    V = V_old = 1, R = 3: value loss_a = 0.5 * (1 - 3)^2 = 2. Off the mask: 0 each; the
    caller's masked mean gives -2 and 2."""
    mask = T([[True, False]])
    logp = T([[-0.5, -0.5]])
    pg, _ = ppo_policy_loss(logp, logp.clone(), T([[2.0, 7.0]]), mask, 0.2)
    vf, _ = ppo_value_loss(T([[1.0, 1.0]]), T([[1.0, 1.0]]), T([[3.0, 9.0]]), mask, 0.2)
    assert pg.tolist() == [[-2.0, 0.0]] and vf.tolist() == [[2.0, 0.0]]
