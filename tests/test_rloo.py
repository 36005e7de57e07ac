"""RLOO on the on-policy engine: the first update's ratio is 1, the G rows of a prompt form
one leave-one-out group, the loss and gradient equal TRL 1.16's RLOOTrainer, the reward
rises on a tiny model, resume equals an uninterrupted run, the CLI."""

from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from helpers import (
    assert_resume_equals_uninterrupted,
    letter_e,
    on_policy_config,
    run_cli,
    write_review_prompts,
)
from prefalign.algorithms import rloo as rloo_module
from prefalign.algorithms.onpolicy import Rollout
from prefalign.algorithms.rloo import RLOO, RLOOConfig, run_rloo

ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0)


@pytest.fixture
def prompts(tmp_path):
    return write_review_prompts(tmp_path)


config = partial(on_policy_config, RLOOConfig, temperature=1.0, num_generations=4)


def test_first_update_of_each_rollout_has_ratio_one(tmp_path, tiny_model_dir, prompts,
                                                    monkeypatch):
    """Every rollout's first micro-batches read the policy that sampled them: sequence
    ratio exactly 1, no clipping; later updates of the rollout see a moved policy."""
    seen = []
    original = rloo_module.rloo_policy_loss

    def spy(logps, old_logps, advantages, **kw):
        losses, stats = original(logps, old_logps, advantages, **kw)
        seen.append({"gap": (logps - old_logps).abs().max().item(),
                     **{k: float(v) for k, v in stats.items()}})
        return losses, stats

    monkeypatch.setattr(rloo_module, "rloo_policy_loss", spy)
    result = run_rloo(config(tmp_path, tiny_model_dir, prompts, batch_size=2, grad_accum=2,
                             num_generations=2, beta=0.1, num_iterations=2), scorer=letter_e)
    # Per rollout: 4 prompts x G = 8 rows, updates of 4 rows in 2 micro-batches, 2 passes.
    per_rollout = 2 * 2 * 2
    assert len(seen) == 2 * per_rollout
    for first in (seen[0], seen[1], seen[per_rollout], seen[per_rollout + 1]):
        assert first["gap"] == 0.0
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert first[key] == 0.0, key
    assert any(m["gap"] > 0 for m in seen[2:per_rollout])
    # The reference (adapters off) is the first rollout's policy; the second has moved.
    assert result.history[0]["kl"] == 0.0 and result.history[1]["kl"] != 0.0


def scored_rollout(scores, lengths, finished, T=5, seed=0):
    """Rows of a 1-token prompt and completions of `lengths` tokens (one of them T long),
    with old and reference token log-probs (0 off the scored tokens), and their scores."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, done in zip(lengths, finished):
        mask = torch.arange(1 + n) >= 1
        old = torch.where(mask, -torch.rand(1 + n, generator=g) * 3, 0.0)
        ref = torch.where(mask, old + torch.randn(1 + n, generator=g) * 0.5, 0.0)
        rows.append({"input_ids": torch.arange(1 + n) + 3, "completion_mask": mask,
                     "attention_mask": torch.ones(1 + n, dtype=torch.long), "finished": done,
                     "old_token_logps": old, "ref_token_logps": ref})
    prompts = [{"prompt": str(i)} for i in range(len(rows))]
    return Rollout(prompts, ["x"] * len(rows), rows, torch.tensor(scores))


def test_g_rows_of_one_prompt_share_one_leave_one_out_group():
    """Rows come as G consecutive samples per prompt; each row's baseline is the mean of the
    other G - 1 rewards of its own group."""
    algo = RLOO(RLOOConfig(model="m", num_generations=3, beta=0.0), 0, ONE_PROCESS)
    rollout = scored_rollout([1.0, 2.0, 6.0, 5.0, 5.0, 5.0], [2, 3, 1, 4, 5, 2], [True] * 6)
    metrics = algo.advantages(rollout)
    assert [r["advantages"] for r in rollout.rows] == [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]
    assert metrics["reward"] == pytest.approx(4.0)
    assert metrics["frac_reward_zero_std"] == pytest.approx(0.5)
    assert metrics["completions/mean_length"] == pytest.approx(17 / 6)
    assert metrics["completions/clipped_ratio"] == 0.0
    assert "kl" not in metrics


def test_an_unscored_sample_leaves_the_baseline_with_advantage_zero():
    """A sample no reward function scored (NaN) is out of its siblings' baselines and gets
    advantage 0; the logged reward is the mean of the scored ones (TRL)."""
    algo = RLOO(RLOOConfig(model="m", num_generations=3, beta=0.0), 0, ONE_PROCESS)
    assert algo.unscorable_rewards
    rollout = scored_rollout([1.0, float("nan"), 3.0], [2, 2, 2], [True] * 3)
    metrics = algo.advantages(rollout)
    assert [r["advantages"] for r in rollout.rows] == [-2.0, 0.0, 2.0]
    assert metrics["reward"] == pytest.approx(2.0)


def trl_rewards_and_advantages(scores, old, ref, mask, beta, group, clip=None, normalize=False):
    """TRL 1.16 RLOOTrainer._generate_and_score_completions's reward -> advantage lines."""
    rewards = scores.clamp(*clip) if clip else scores
    per_token_kl = old - ref
    if beta:
        rewards = rewards - beta * (per_token_kl * mask).sum(-1)
    grouped = rewards.view(-1, group)
    baselines = (grouped.sum(1, keepdim=True) - grouped) / (group - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    kl = (per_token_kl * mask).sum() / mask.sum().clamp(min=1)
    return rewards, advantages, kl.item()


class OneProcess:
    """The accelerator calls TRL's `_compute_loss` makes, for a single process."""

    num_processes = 1

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


def trl_loss(per_token_logps, entropies, mask, old, advantages, eps_high):
    from trl.trainer.rloo_trainer import RLOOTrainer

    obj = object.__new__(RLOOTrainer)
    obj.__dict__.update(aux_loss_enabled=False, model=SimpleNamespace(training=True),
                        accelerator=OneProcess(), epsilon_low=0.2, epsilon_high=eps_high,
                        _metrics={"train": defaultdict(list)})
    obj._get_per_token_logps_and_entropies = lambda *a, **k: (per_token_logps, entropies, None)
    B, T = mask.shape
    inputs = {"prompt_ids": torch.ones(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask,
              "old_logps": (old * mask).sum(1), "advantages": advantages}
    loss = obj._compute_loss(None, inputs)
    return loss, {k: v[0] for k, v in obj._metrics["train"].items()}


@pytest.mark.parametrize("beta, mask_truncated, clip, normalize", [
    (0.0, False, None, False), (0.1, False, None, False), (0.0, True, None, False),
    (0.1, True, None, False), (0.1, False, [-0.5, 1.5], True)])
def test_loss_and_gradient_equal_trl(beta, mask_truncated, clip, normalize):
    """One fixed rollout through our advantages, collate and compute_loss, against TRL's
    reward/advantage lines and its real _compute_loss: loss, gradient, metrics."""
    pytest.importorskip("trl")
    G, T = 3, 5
    scores = [0.9, -0.4, 1.7, 0.2, 0.3, -1.1]
    lengths, finished = [5, 3, 1, 4, 2, 5], [True, True, False, True, True, False]
    rollout = scored_rollout(scores, lengths, finished, T, seed=1)
    cfg = RLOOConfig(model="m", num_generations=G, beta=beta, epsilon_high=0.28,
                     mask_truncated_completions=mask_truncated, reward_clip_range=clip,
                     normalize_advantages=normalize)
    algo = RLOO(cfg, 0, ONE_PROCESS, reference=object() if beta else None)
    metrics = algo.advantages(rollout)
    batch = algo.collate(rollout.rows)

    # The same tensors in TRL's layout: completion tokens only, truncated rows zeroed.
    keep = torch.tensor([f or not mask_truncated for f in finished])
    mask = (batch.completion_mask[:, 1:] & keep[:, None]).float()
    old, ref = batch.old_token_logps[:, 1:], batch.ref_token_logps[:, 1:]
    _, trl_adv, trl_kl = trl_rewards_and_advantages(torch.tensor(scores), old, ref, mask, beta,
                                                    G, clip, normalize)
    torch.testing.assert_close(batch.advantages, trl_adv, atol=1e-6, rtol=0)
    if beta:
        assert metrics["kl"] == pytest.approx(trl_kl, abs=1e-6)

    g = torch.Generator().manual_seed(4)  # a seed whose ratios clip both ways in every case
    new = old + torch.randn(old.shape, generator=g) * 0.3
    entropy = torch.rand(old.shape, generator=g)
    ours_in, trl_in = new.clone().requires_grad_(), new.clone().requires_grad_()

    def model(input_ids, attention_mask, completion_mask, temperature=1.0, stats=False):
        scored = completion_mask.bool().clone()
        pad = torch.zeros(len(scored), 1)
        return SimpleNamespace(token_logps=torch.cat([pad, ours_in], 1) * scored, mask=scored,
                               entropy=torch.cat([pad, entropy], 1))

    loss, stats = algo.compute_loss(model, batch)
    loss.backward()
    theirs, trl_metrics = trl_loss(trl_in, entropy, mask, old, trl_adv, 0.28)
    theirs.backward()
    assert abs(loss.item() - theirs.item()) < 1e-5
    assert ours_in.grad.abs().sum() > 0
    torch.testing.assert_close(ours_in.grad, trl_in.grad, atol=1e-5, rtol=0)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "entropy"):
        assert stats[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key
    assert stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0


def test_rloo_raises_the_reward(tmp_path, tiny_model_dir, prompts):
    """Full fine-tuning with the KL in the reward (a frozen reference) and normalised
    advantages; the reward rises. The letter-e rewards differ by hundredths, so beta is
    small: at the default 0.05 the KL (~0.5 per completion) outweighs them. Measured gains
    (mean of the last two steps over the first two): 0.075 at seed 3, 0.047 at seed 4."""
    result = run_rloo(config(tmp_path, tiny_model_dir, prompts, max_steps=12, lora_r=0,
                             learning_rate=3e-3, batch_size=8, beta=0.01,
                             normalize_advantages=True), scorer=letter_e)
    rewards = [r["reward"] for r in result.history]
    early, late = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert late > early + 0.04, rewards
    assert result.history[-1]["kl"] > 0
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
                "completions/mean_length", "completions/clipped_ratio",
                "completions/mean_terminated_length", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "loss"):
        assert key in result.history[-1], key
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, prompts):
    assert_resume_equals_uninterrupted(run_rloo, config, tmp_path, tiny_model_dir, prompts,
                                       letter_e, num_generations=2, batch_size=2, grad_accum=2,
                                       beta=0.1)


def test_help_lists_the_rloo_section(capsys):
    code, out, _ = run_cli(capsys, ["rloo", "--help"])
    assert code == 0
    assert "\nrloo:\n" in out
    for flag in ("--num-generations", "--beta", "--epsilon", "--epsilon-high",
                 "--normalize-advantages", "--reward-clip-range", "--num-iterations",
                 "--mask-truncated-completions", "--reward-fn", "--reward-model"):
        assert flag in out, flag


@pytest.mark.parametrize("flags, field", [(["--num-generations", "1"], "num_generations"),
                                          (["--reward-clip-range", "1,0"], "reward_clip_range"),
                                          (["--beta", "-0.1"], "beta")])
def test_bad_options_are_refused_in_one_line(capsys, tmp_path, flags, field):
    code, _, err = run_cli(capsys, ["rloo", "--model", "m", "--data", "d", "--reward-fn", "x",
                                    "--output-dir", tmp_path / "o", *flags])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert field in err and "Traceback" not in err
