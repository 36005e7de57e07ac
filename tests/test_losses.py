"""Losses: hand-computed values, invariances, and equality with TRL 1.16's own code.

Shared hand example for the reference-based pair losses (beta = 0.1 unless stated):
pi_c = -1, pi_r = -3, ref_c = -2, ref_r = -2
  -> log-ratios c = -1 + 2 = 1, r = -3 + 2 = -1, h = c - r = 2, beta * h = 0.2,
     rewards 0.1 * 1 = 0.1 and 0.1 * -1 = -0.1.
softplus(x) = log(1 + e^x) = -log sigmoid(-x).
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefalign.losses import (
    PREFERENCE_LOSS_ALIASES,
    PREFERENCE_LOSS_CHOICES,
    PREFERENCE_LOSS_NAMES,
    PREFERENCE_LOSSES,
    LossParams,
    PairLogps,
    bradley_terry_loss,
    kto_kl_estimate,
    kto_loss,
    nll_loss,
    preference_loss,
)

LN2 = math.log(2)


def t(*values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def hand_pair(**lengths):
    return PairLogps(t(-1.0), t(-3.0), t(-2.0), t(-2.0), **lengths)


def check(name, logps, params, loss, chosen_reward, rejected_reward):
    out = preference_loss(name, logps, params)
    torch.testing.assert_close(out.losses, t(*loss), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, t(*chosen_reward), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, t(*rejected_reward), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- hand-computed values


def test_sigmoid_hand():
    """loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.5981389."""
    check("sigmoid", hand_pair(), LossParams(beta=0.1), [0.5981389], [0.1], [-0.1])


def test_sigmoid_label_smoothing_is_cdpo():
    """eps = 0.1: 0.9 * softplus(-0.2) + 0.1 * softplus(0.2) = 0.9 * 0.5981389 + 0.1 * 0.7981389
    = 0.6181389 (= 0.5981389 + eps * 0.2, since softplus(z) = softplus(-z) + z)."""
    check("sigmoid", hand_pair(), LossParams(0.1, label_smoothing=0.1), [0.6181389], [0.1], [-0.1])


def test_robust_hand():
    """eps = 0.1: (0.9 * 0.5981389 - 0.1 * 0.7981389) / (1 - 0.2) = 0.4585111 / 0.8 = 0.5731389."""
    check("robust", hand_pair(), LossParams(0.1, label_smoothing=0.1), [0.5731389], [0.1], [-0.1])


def test_hinge_hand():
    """Row 1: max(0, 1 - 0.2) = 0.8. Row 2 (pi_c = 9, h = 12, beta * h = 1.2): max(0, -0.2) = 0;
    its rewards 0.1 * 11 = 1.1 and -0.1."""
    logps = PairLogps(t(-1.0, 9.0), t(-3.0, -3.0), t(-2.0, -2.0), t(-2.0, -2.0))
    check("hinge", logps, LossParams(0.1), [0.8, 0.0], [0.1, 1.1], [-0.1, -0.1])


def test_ipo_hand():
    """|y_c| = 2, |y_r| = 4: h = 1/2 - (-1)/4 = 0.75, 1/(2 beta) = 5, loss = (0.75 - 5)^2
    = 18.0625; rewards use the unnormalised log-ratios: 0.1 and -0.1.
    An empty completion (pi = ref = 0, 0 tokens) counts as one token, as in TRL.
    Row 2, rejected empty: h = 1/2 - 0/1 = 0.5, loss = (0.5 - 5)^2 = 20.25; rewards 0.1, 0.
    Row 3, both empty: h = 0, loss = 5^2 = 25; rewards 0, 0."""
    logps = PairLogps(
        t(-1.0, -1.0, 0.0),
        t(-3.0, 0.0, 0.0),
        t(-2.0, -2.0, 0.0),
        t(-2.0, 0.0, 0.0),
        t(2.0, 2.0, 0.0),
        t(4.0, 0.0, 0.0),
    )
    check("ipo", logps, LossParams(0.1), [18.0625, 20.25, 25.0], [0.1, 0.1, 0.0], [-0.1, 0.0, 0.0])


def test_sppo_hard_hand():
    """(1 - 0.5/0.1)^2 + (-1 + 0.5/0.1)^2 = 16 + 16 = 32."""
    check("sppo_hard", hand_pair(), LossParams(0.1), [32.0], [0.1], [-0.1])


def test_nca_pair_hand():
    """r_c = 0.1, r_r = -0.1: softplus(-0.1) + 0.5 softplus(0.1) + 0.5 softplus(-0.1)
    = 0.6443967 + 0.5 * 0.7443967 + 0.5 * 0.6443967 = 1.3387933."""
    check("nca_pair", hand_pair(), LossParams(0.1), [1.3387933], [0.1], [-0.1])


def test_bco_pair_hand():
    """-log sigmoid(0.1) - log sigmoid(0.1) = 2 * 0.6443967 = 1.2887933."""
    check("bco_pair", hand_pair(), LossParams(0.1), [1.2887933], [0.1], [-0.1])


def test_apo_zero_hand():
    """1 - sigmoid(0.1) + sigmoid(-0.1) = 2 * 0.4750208 = 0.9500416."""
    check("apo_zero", hand_pair(), LossParams(0.1), [0.9500416], [0.1], [-0.1])


def test_apo_down_hand():
    """sigmoid(0.1) + 1 - sigmoid(0.1 - (-0.1)) = 0.5249792 + 1 - 0.5498340 = 0.9751452."""
    check("apo_down", hand_pair(), LossParams(0.1), [0.9751452], [0.1], [-0.1])


def test_simpo_hand():
    """beta = 2, gamma = 0.5, pi_c = -4 over 4 tokens (avg -1), pi_r = -9 over 3 (avg -3), no
    reference: z = 2 * (-1 - (-3)) - 0.5 = 3.5, loss = softplus(-3.5) = 0.0297504; rewards
    2 * -1 = -2 and 2 * -3 = -6. With eps = 0.1: 0.9 * 0.0297504 + 0.1 * 3.5297504 = 0.3797504."""
    logps = PairLogps(t(-4.0), t(-9.0), chosen_lengths=t(4.0), rejected_lengths=t(3.0))
    check("simpo", logps, LossParams(2.0, simpo_gamma=0.5), [0.0297504], [-2.0], [-6.0])
    smoothed = LossParams(2.0, label_smoothing=0.1, simpo_gamma=0.5)
    check("simpo", logps, smoothed, [0.3797504], [-2.0], [-6.0])


def test_orpo_hand():
    """beta = 0.1. Chosen: 2 tokens, sum 2 ln 0.5 -> avg ln 0.5, P = 0.5, odds = 1. Rejected:
    3 tokens, sum 3 ln 0.2 -> P = 0.2, odds = 0.25. log odds ratio = ln 4,
    loss = -0.1 * log sigmoid(ln 4) = 0.1 * ln(5/4) = 0.0223144;
    rewards 0.1 * ln 0.5 = -0.0693147, 0.1 * ln 0.2 = -0.1609438."""
    logps = PairLogps(
        t(2 * math.log(0.5)), t(3 * math.log(0.2)), chosen_lengths=t(2.0), rejected_lengths=t(3.0)
    )
    check("orpo", logps, LossParams(0.1), [0.0223144], [-0.0693147], [-0.1609438])


def test_orpo_near_certain_completion_fp32():
    """beta = 1, one token each, fp32. Chosen ln 0.5: odds 1, log odds 0. Rejected -1e-4:
    1 - e^-1e-4 = 9.9995e-5, log odds = -1e-4 - ln(9.9995e-5) = 9.2102904;
    loss = -log sigmoid(0 - 9.2102904) = softplus(9.2102904) = 9.2103904.
    The naive log(1 - exp(x)) is off by 2e-4 here in fp32."""
    one = t(1.0, dtype=torch.float32)
    logps = PairLogps(t(math.log(0.5), dtype=torch.float32), t(-1e-4, dtype=torch.float32))
    logps = PairLogps(logps.chosen, logps.rejected, chosen_lengths=one, rejected_lengths=one)
    out = preference_loss("orpo", logps, LossParams(1.0))
    torch.testing.assert_close(out.losses, t(9.2103904, dtype=torch.float32), atol=1e-5, rtol=0)


def test_nll_hand():
    """Masked tokens -1, -2 (row 1) and -3 (row 2): token mean over the batch = 6 / 3 = 2.0
    (a mean of row means would give (1.5 + 3) / 2 = 2.25). The -inf sits at an excluded
    position and must not leak in."""
    token_logps = t(-1.0, -2.0, -float("inf"), -3.0, -7.0, -7.0).view(2, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(nll_loss(token_logps, mask), t(2.0)[0])
    assert nll_loss(token_logps, torch.zeros_like(mask)).item() == 0.0


def test_kto_hand():
    """beta = 0.1, z0 = 0.5, desirable_weight 1, undesirable_weight 1.33.
    Desirable r = 1.5: 1 - sigmoid(0.1 * (1.5 - 0.5)) = 0.4750208.
    Undesirable r = -1.5: 1.33 * (1 - sigmoid(0.1 * (0.5 + 1.5))) = 1.33 * 0.4501660 = 0.5987208.
    Rewards 0.1 * r: 0.15, -0.15 (row order kept)."""
    losses, rewards = kto_loss(
        t(-1.0, -4.0), t(-2.5, -2.5), torch.tensor([True, False]), t(0.5)[0], 0.1, 1.0, 1.33
    )
    torch.testing.assert_close(losses, t(0.4750208, 0.5987208), atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards, t(0.15, -0.15))


def test_kto_kl_estimate_hand():
    """Differences 1, 0, -0.5: mean 1/6 = 0.1666667. Differences -1, 0.5: mean -0.25 -> 0."""
    pol = t(-1.0, -2.0, -3.0, grad=True)
    kl = kto_kl_estimate(pol, t(-2.0, -2.0, -2.5))
    torch.testing.assert_close(kl, t(1 / 6)[0])
    assert not kl.requires_grad
    assert kto_kl_estimate(t(-3.0, -1.5), t(-2.0, -2.0)).item() == 0.0


def test_bradley_terry_hand():
    """Row 1: r_c = 2, r_r = 0.5, margin 0.5: -log sigmoid(1.0) = 0.3132617, plus
    0.01 * (2 + 0.5)^2 = 0.0625 -> 0.3757617. Row 2: r_c = r_r = 0, margin 0: ln 2 + 0."""
    rc, rr = t(2.0, 0.0), t(0.5, 0.0)
    out = bradley_terry_loss(rc, rr, margin=t(0.5, 0.0), center_coef=0.01)
    torch.testing.assert_close(out, t(0.3757617, LN2), atol=1e-6, rtol=0)
    # No margin, no centring: -log sigmoid(1.5) = 0.2014133 and ln 2.
    torch.testing.assert_close(bradley_terry_loss(rc, rr), t(0.2014133, LN2), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- invariances and contracts

# Loss when the policy equals the reference (or, reference-free, equal average log-probs);
# beta = 0.1, gamma = 0.5, robust eps = 0.1.
ZERO_MARGIN = {
    "dpo": LN2,  # -log sigmoid(0)
    "robust": LN2,  # ((1 - eps) ln 2 - eps ln 2) / (1 - 2 eps)
    "hinge": 1.0,  # max(0, 1 - 0)
    "ipo": 25.0,  # (0 - 1 / 0.2)^2
    "sppo_hard": 50.0,  # 5^2 + 5^2
    "nca_pair": 2 * LN2,  # ln 2 + 0.5 ln 2 + 0.5 ln 2
    "bco_pair": 2 * LN2,
    "apo_zero": 1.0,  # 1 - 0.5 + 0.5
    "apo_down": 1.0,  # 0.5 + 1 - 0.5
    "simpo": math.log1p(math.exp(0.5)),  # softplus(gamma) = 0.9740770
    "orpo": 0.1 * LN2,  # -0.1 log sigmoid(0)
}


def params_for(name, beta=0.1):
    return LossParams(beta, label_smoothing=0.1 if name == "robust" else 0.0, simpo_gamma=0.5)


@pytest.mark.parametrize("name", PREFERENCE_LOSS_NAMES)
def test_zero_margin_constant(name):
    assert set(ZERO_MARGIN) == set(PREFERENCE_LOSS_NAMES)
    # chosen: -2 over 2 tokens, rejected: -3 over 3 tokens: equal averages (-1) and
    # policy == reference, so every margin is zero.
    logps = PairLogps(t(-2.0), t(-3.0), t(-2.0), t(-3.0), t(2.0), t(3.0))
    out = preference_loss(name, logps, params_for(name))
    torch.testing.assert_close(out.losses, t(ZERO_MARGIN[name]), atol=1e-7, rtol=0)


def random_pairs(n=5, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(
            grad
        )

    lengths = [torch.randint(1, 9, (n,), generator=g).double() for _ in range(2)]
    return PairLogps(r(-12, -2), r(-12, -2), r(-12, -2), r(-12, -2), *lengths)


@pytest.mark.parametrize("name", PREFERENCE_LOSS_NAMES)
def test_per_row_beta_equals_rows_run_separately(name):
    """Also: a float64 beta tensor does not promote float32 log-probs."""
    betas = [0.1, 0.5, 2.0]
    logps = PairLogps(*(f.float() for f in vars(random_pairs(3, seed=1)).values()))
    beta = torch.tensor(betas, dtype=torch.float64)
    out = preference_loss(name, logps, params_for(name, beta=beta))
    assert out.losses.dtype == out.chosen_rewards.dtype == torch.float32
    for i, beta in enumerate(betas):
        row = PairLogps(*(None if f is None else f[i : i + 1] for f in vars(logps).values()))
        ref = preference_loss(name, row, params_for(name, beta=beta))
        torch.testing.assert_close(out.losses[i : i + 1], ref.losses)
        torch.testing.assert_close(out.chosen_rewards[i : i + 1], ref.chosen_rewards)
        torch.testing.assert_close(out.rejected_rewards[i : i + 1], ref.rejected_rewards)


def test_label_smoothing_zero_is_plain_dpo():
    """cDPO and robust DPO at eps = 0 both reduce to -log sigmoid(beta * h)."""
    logps = random_pairs(seed=2)
    h = (logps.chosen - logps.ref_chosen) - (logps.rejected - logps.ref_rejected)
    plain = -torch.nn.functional.logsigmoid(0.3 * h)
    for name in ("sigmoid", "robust"):
        torch.testing.assert_close(preference_loss(name, logps, LossParams(0.3)).losses, plain)
    smoothed = preference_loss("sigmoid", logps, LossParams(0.3, label_smoothing=0.2)).losses
    assert not torch.allclose(smoothed, plain)


def test_dpo_and_its_alias_sigmoid_give_identical_losses():
    """`sigmoid` (TRL's name) runs the registered `dpo` loss: the same losses and rewards,
    bit for bit, with and without label smoothing; both are accepted choices."""
    logps = random_pairs(seed=4)
    for params in (LossParams(0.3), LossParams(0.3, label_smoothing=0.2)):
        dpo, sigmoid = (preference_loss(n, logps, params) for n in ("dpo", "sigmoid"))
        assert torch.equal(dpo.losses, sigmoid.losses)
        assert torch.equal(dpo.chosen_rewards, sigmoid.chosen_rewards)
        assert torch.equal(dpo.rejected_rewards, sigmoid.rejected_rewards)
    assert PREFERENCE_LOSS_ALIASES == {"sigmoid": "dpo"}
    assert {"dpo", "sigmoid"} <= set(PREFERENCE_LOSS_CHOICES)
    assert "sigmoid" not in PREFERENCE_LOSSES


def test_registry_flags():
    flags = {n: (s.reference_free, s.needs_lengths) for n, s in PREFERENCE_LOSSES.items()}
    assert {n for n, (free, _) in flags.items() if free} == {"simpo", "orpo"}
    assert {n for n, (_, lengths) in flags.items() if lengths} == {"ipo", "simpo", "orpo"}
    assert PREFERENCE_LOSS_NAMES == tuple(PREFERENCE_LOSSES)


@pytest.mark.parametrize("name", PREFERENCE_LOSS_NAMES)
def test_missing_inputs_are_reported(name):
    spec = PREFERENCE_LOSSES[name]
    full = random_pairs(seed=3)
    no_refs = PairLogps(
        full.chosen, full.rejected, None, None, full.chosen_lengths, full.rejected_lengths
    )
    if spec.reference_free:
        preference_loss(name, no_refs, params_for(name))  # runs without a reference
    else:
        with pytest.raises(ValueError, match="reference"):
            preference_loss(name, no_refs, params_for(name))
    no_lengths = PairLogps(full.chosen, full.rejected, full.ref_chosen, full.ref_rejected)
    if spec.needs_lengths:
        with pytest.raises(ValueError, match="lengths"):
            preference_loss(name, no_lengths, params_for(name))
    else:
        preference_loss(name, no_lengths, params_for(name))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        preference_loss("dpo_typo", random_pairs(), LossParams())
    assert "dpo_typo" in str(err.value)
    for name in PREFERENCE_LOSS_NAMES:
        assert name in str(err.value)


def test_bad_params_rejected():
    with pytest.raises(ValueError, match="beta"):
        LossParams(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        LossParams(label_smoothing=0.6)
    with pytest.raises(ValueError, match="robust"):
        preference_loss("robust", random_pairs(), LossParams(label_smoothing=0.5))
    with pytest.raises(ValueError, match="no effect"):
        preference_loss("hinge", random_pairs(), LossParams(label_smoothing=0.1))


@pytest.mark.parametrize("name", PREFERENCE_LOSS_NAMES)
def test_gradients_reach_policy_only(name):
    logps = random_pairs(seed=4, grad=True)
    out = preference_loss(name, logps, params_for(name, beta=0.05))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert logps.ref_chosen.grad is None and logps.ref_rejected.grad is None
    for policy in (logps.chosen, logps.rejected):
        assert torch.isfinite(policy.grad).all() and policy.grad.abs().sum() > 0


def test_kto_gradients_reach_policy_only():
    pol, ref = t(-1.0, -4.0, grad=True), t(-2.5, -2.5, grad=True)
    kl = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    losses, rewards = kto_loss(pol, ref, torch.tensor([True, False]), kl, 0.1)
    losses.sum().backward()
    assert ref.grad is None and kl.grad is None and not rewards.requires_grad
    assert (pol.grad != 0).all()


def test_extreme_margins_stay_finite():
    """|beta * h| = 1e4: the logistic losses are 0 or 1e4, never inf or nan, and gradients stay
    finite. ORPO with an average log-prob that rounded to 0 (probability 1) stays finite."""
    big = PairLogps(t(0.0, -2e4, grad=True), t(-2e4, 0.0), t(-1e4, -1e4), t(-1e4, -1e4))
    out = preference_loss("sigmoid", big, LossParams(0.5))
    torch.testing.assert_close(out.losses, t(0.0, 1e4))
    out.losses.sum().backward()
    assert torch.isfinite(big.chosen.grad).all()
    for c, r in ((0.0, -2.0), (-2.0, 0.0), (0.0, 0.0)):
        sums = t(c, grad=True), t(r, grad=True)
        out = preference_loss("orpo", PairLogps(*sums, None, None, t(2.0), t(2.0)), LossParams())
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all()
        assert all(torch.isfinite(s.grad).all() for s in sums)


# ---------------------------------------------------------------- against TRL 1.16's code
# TRL computes its losses inside trainer methods. These tests call those methods unbound on a
# minimal stand-in for the trainer (only the attributes the method reads) and a stand-in
# model returning the per-token log-probs TRL's fused LM head would (zero off completions),
# so TRL's exact code runs on the same numbers without building a trainer or a model.

ACCEL = SimpleNamespace(
    device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
)


def trl_module():
    return pytest.importorskip("trl", minversion="1.16")


def stand_in(**attrs):
    return SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=ACCEL,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


def stand_in_model(per_token):
    """Whatever the inputs, return `per_token` (N, T - 1) as TRL's fused-head output."""

    def model(**kwargs):
        zeros = torch.zeros_like(per_token, requires_grad=False)
        return SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    return model


def token_batch(n, seed, width=7):
    """Per-token log-probs (n, width - 1) with 1..width-1 completion tokens after one prompt
    token; zero outside completions, as TRL's fused head returns them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width, (n,), generator=g)
    pos = torch.arange(width)[None, :]
    mask = ((pos >= 1) & (pos <= lengths[:, None])).long()
    tokens = -3 * torch.rand(n, width - 1, generator=g, dtype=torch.float64) * mask[:, 1:]
    return tokens.requires_grad_(True), mask


def trl_dpo(trl, loss_type, tokens, mask, ref, beta, label_smoothing):
    fake = stand_in(
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=None,
    )
    b = ref.shape[0] // 2
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:b],
        "ref_rejected_logps": ref[b:],
    }
    loss = trl.DPOTrainer._compute_loss(fake, stand_in_model(tokens), inputs, False)
    return loss, fake._metrics["eval"]


DPO_FAMILY = [n for n, s in PREFERENCE_LOSSES.items() if not s.reference_free]
TRL_NAMES = {name: alias for alias, name in PREFERENCE_LOSS_ALIASES.items()}  # dpo -> sigmoid


@pytest.mark.parametrize("name", DPO_FAMILY)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_family_matches_trl(name, beta):
    trl = trl_module()
    b = 4
    eps = 0.2 if name == "robust" else 0.0  # TRL's "sigmoid" has no label smoothing
    tokens, mask = token_batch(2 * b, seed=5)
    # Log-ratios in [-3, 3] nats: both signs, and both sides of the hinge at beta = 0.7.
    noise = torch.rand(2 * b, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref = tokens.detach().sum(1) + 6 * noise - 3

    ours_tokens = tokens.detach().clone().requires_grad_(True)
    sums, lengths = ours_tokens.sum(1), mask.sum(1).double()
    logps = PairLogps(sums[:b], sums[b:], ref[:b], ref[b:], lengths[:b], lengths[b:])
    ours = preference_loss(name, logps, LossParams(beta, label_smoothing=eps))
    ours.losses.mean().backward()

    theirs, _ = trl_dpo(trl, TRL_NAMES.get(name, name), tokens, mask, ref, beta, eps)
    theirs.backward()
    torch.testing.assert_close(ours.losses.mean(), theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_tokens.grad, tokens.grad, atol=1e-6, rtol=0)

    for i in range(b):  # per example, rewards included: one pair per call
        rows = [i, b + i]
        loss, metrics = trl_dpo(trl, TRL_NAMES.get(name, name), tokens.detach()[rows],
                                mask[rows], ref[rows], beta, eps)
        assert ours.losses[i].item() == pytest.approx(loss.item(), abs=1e-6)
        assert ours.chosen_rewards[i].item() == pytest.approx(
            metrics["rewards/chosen"][-1], abs=1e-6
        )
        assert ours.rejected_rewards[i].item() == pytest.approx(
            metrics["rewards/rejected"][-1], abs=1e-6
        )


def test_nll_matches_trl_sft_term():
    trl = trl_module()
    tokens, mask = token_batch(6, seed=7)
    ref = torch.zeros(6, dtype=torch.float64)
    theirs, _ = trl_dpo(trl, "sft", tokens, mask, ref, 0.1, 0.0)
    chosen_mask = mask[:3, 1:].bool()
    torch.testing.assert_close(nll_loss(tokens[:3], chosen_mask), theirs, atol=1e-6, rtol=0)


def reference_free_inputs(seed, dtype, n=8):
    """Sums whose per-token averages are log-uniform in [-8, -1e-3], so both branches of
    log1mexp (above and below -ln 2) are exercised."""
    g = torch.Generator().manual_seed(seed)
    lengths = [torch.randint(1, 9, (n,), generator=g).to(dtype) for _ in range(2)]
    log_mag = math.log(1e-3) + (math.log(8) - math.log(1e-3)) * torch.rand(2, n, generator=g)
    averages = -log_mag.exp().to(dtype)
    assert (averages > -LN2).any() and (averages < -LN2).any()
    return [averages[0] * lengths[0], averages[1] * lengths[1]], lengths


EXPERIMENTAL = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


@EXPERIMENTAL
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo(label_smoothing):
    trl_module()
    from trl.experimental.cpo import CPOTrainer

    (c, r), (lc, lr) = reference_free_inputs(8, torch.float64)
    params = LossParams(2.0, label_smoothing=label_smoothing, simpo_gamma=0.8)
    fake = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=0.8,
        beta=2.0,
        label_smoothing=label_smoothing,
        accelerator=ACCEL,
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, c / lc, r / lr)
    ours = preference_loss("simpo", PairLogps(c, r, None, None, lc, lr), params)
    torch.testing.assert_close(ours.losses, losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, atol=1e-6, rtol=0)


@EXPERIMENTAL
def test_orpo_matches_trl():
    """TRL returns +beta * log sigmoid(log odds ratio) and subtracts it; ours is its negative.
    Average log-probs range over both branches of log1mexp (above and below -ln 2)."""
    trl_module()
    from trl.experimental.orpo import ORPOTrainer

    (c, r), (lc, lr) = reference_free_inputs(9, torch.float32)
    c.requires_grad_(True)
    fake = SimpleNamespace(beta=0.25, accelerator=ACCEL)
    theirs, chosen_rewards, rejected_rewards, *_ = ORPOTrainer.odds_ratio_loss(fake, c / lc, r / lr)
    (grad_theirs,) = torch.autograd.grad(-theirs.sum(), c)
    ours = preference_loss("orpo", PairLogps(c, r, None, None, lc, lr), LossParams(0.25))
    (grad_ours,) = torch.autograd.grad(ours.losses.sum(), c)
    torch.testing.assert_close(ours.losses, -theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kl_shift", [1.5, -4.0])  # positive KL, and a negative one clamped to 0
def test_kto_matches_trl(kl_shift):
    trl = trl_module()
    n, beta, wd, wu = 6, 0.3, 1.0, 1.5
    tokens, mask = token_batch(n, seed=10)
    kl_tokens, _ = token_batch(n, seed=11, width=9)  # another width tells KL calls apart
    g = torch.Generator().manual_seed(12)
    ref = tokens.detach().sum(1) - 2 * torch.rand(n, generator=g, dtype=torch.float64) + 1
    ref_kl = kl_tokens.detach().sum(1) - kl_shift + torch.rand(n, generator=g, dtype=torch.float64)
    labels = torch.tensor([True, False, True, True, False, False])

    def run_trl(rows):
        fake = stand_in(
            calculate_KL=True,
            loss_type="kto",
            beta=beta,
            desirable_weight=wd,
            undesirable_weight=wu,
        )
        fake._compute_kl_logps = lambda m, b: trl.KTOTrainer._compute_kl_logps(fake, m, b)
        batch = {
            "label": labels[rows],
            "input_ids": torch.zeros_like(mask[rows]),
            "attention_mask": torch.ones_like(mask[rows]),
            "completion_mask": mask[rows],
            "KL_input_ids": torch.zeros(n, 9, dtype=torch.long),
            "KL_attention_mask": torch.ones(n, 9),
            "KL_completion_mask": torch.ones(n, 9),
            "ref_logps": ref[rows],
            "ref_KL_logps": ref_kl,
        }

        def model(input_ids, **kwargs):
            out = kl_tokens.detach() if input_ids.shape[1] == 9 else tokens[rows]
            return stand_in_model(out)()

        return trl.KTOTrainer._compute_loss(fake, model, batch, False), fake._metrics["eval"]

    kl = kto_kl_estimate(kl_tokens.sum(1), ref_kl)
    ours_tokens = tokens.detach().clone().requires_grad_(True)
    losses, rewards = kto_loss(ours_tokens.sum(1), ref, labels, kl, beta, wd, wu)
    losses.mean().backward()
    theirs, metrics = run_trl(list(range(n)))
    theirs.backward()
    assert kl.item() == pytest.approx(metrics["kl"][-1], abs=1e-6)
    assert (kl.item() == 0.0) == (kl_shift < 0)
    torch.testing.assert_close(losses.mean(), theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_tokens.grad, tokens.grad, atol=1e-6, rtol=0)
    for i in range(n):
        loss, metrics = run_trl([i])
        key = "rewards/chosen" if labels[i] else "rewards/rejected"
        assert losses[i].item() == pytest.approx(loss.item(), abs=1e-6)
        assert rewards[i].item() == pytest.approx(metrics[key][-1], abs=1e-6)


@pytest.mark.parametrize("margin", [None, "rows"])
def test_bradley_terry_matches_trl(margin):
    trl = trl_module()
    g = torch.Generator().manual_seed(13)
    rewards = (3 * torch.randn(10, generator=g, dtype=torch.float64)).requires_grad_(True)
    inputs = {
        "input_ids": torch.zeros(10, 3, dtype=torch.long),
        "attention_mask": torch.ones(10, 3),
    }
    margins = None
    if margin:
        margins = torch.rand(5, generator=g, dtype=torch.float64)
        inputs["margin"] = margins
    fake = stand_in(args=SimpleNamespace(center_rewards_coefficient=0.01))

    def model(**kwargs):
        return SimpleNamespace(logits=rewards[:, None])

    theirs = trl.RewardTrainer.compute_loss(fake, model, inputs)
    (grad_theirs,) = torch.autograd.grad(theirs, rewards)
    ours = bradley_terry_loss(rewards[:5], rewards[5:], margins, center_coef=0.01).mean()
    (grad_ours,) = torch.autograd.grad(ours, rewards)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-6, rtol=0)
