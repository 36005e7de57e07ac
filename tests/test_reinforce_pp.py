"""REINFORCE++ on the on-policy loop: hand-computed returns and advantages, whitening over
the whole (global) batch, the baseline variant, ratio 1 on the first update, the reward
rises, resume equals an uninterrupted run, bad options end in one line."""

import math
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
from prefalign.algorithms import reinforce_pp as rpp_module
from prefalign.algorithms.onpolicy import Rollout
from prefalign.algorithms.reinforce_pp import ReinforcePP, ReinforcePPConfig, run_reinforce_pp

ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0)


@pytest.fixture
def prompts(tmp_path):
    return write_review_prompts(tmp_path)


config = partial(on_policy_config, ReinforcePPConfig, temperature=1.0)


def row(prompt_len: int, old: list[float], ref: list[float]) -> dict:
    """A rollout row of prompt_len prompt tokens then len(old) completion tokens, with the
    old and reference log-probs of the completion tokens (0 on the prompt)."""
    n = prompt_len + len(old)
    completion = torch.arange(n) >= prompt_len
    pad = [0.0] * prompt_len
    return {"input_ids": torch.arange(n) + 5, "attention_mask": torch.ones(n, dtype=torch.long),
            "completion_mask": completion, "finished": True,
            "old_token_logps": torch.tensor(pad + old), "ref_token_logps": torch.tensor(pad + ref)}


def advantages_of(rows, scores, accelerator=ONE_PROCESS, reference=True, **kw):
    cfg = ReinforcePPConfig(model="m", **kw)
    algo = ReinforcePP(cfg, 0, accelerator, reference=object() if reference else None)
    metrics = algo.advantages(Rollout([{"prompt": "p"}] * len(rows), ["x"] * len(rows), rows,
                                      torch.tensor(scores)))
    return [a for r in rows for a, m in zip(r["advantages"].tolist(),
                                            r["completion_mask"].tolist()) if m], metrics


def test_returns_and_advantages_by_hand():
    """kl_coef 0.1, k1, gamma 0.5. Row 1 (1 prompt token, 3 completion tokens), score 1:
    KL = old - ref = [0.5, 0, -0.5], r = [-0.05, 0, 0.05 + 1];
    G = [-0.05 + 0.5 * 0.525, 0 + 0.5 * 1.05, 1.05] = [0.2125, 0.525, 1.05].
    Row 2 (3 prompt tokens, 2 completion tokens), score -1, KL 0: G = [-0.5, -1].
    Whitened over the 5 tokens: mean 0.2875 / 5 = 0.0575, deviations
    [0.155, 0.4675, 0.9925, -0.5575, -1.0575], unbiased variance 2.65675 / 4 = 0.6641875."""
    rows = [row(1, [-1.0, -1.0, -1.0], [-1.5, -1.0, -0.5]), row(3, [-2.0, -2.0], [-2.0, -2.0])]
    advantages, metrics = advantages_of(rows, [1.0, -1.0], kl_coef=0.1, gamma=0.5)
    deviations = [0.155, 0.4675, 0.9925, -0.5575, -1.0575]
    expected = [d / math.sqrt(0.6641875 + 1e-8) for d in deviations]
    assert advantages == pytest.approx(expected, abs=1e-6)
    for r in rows:  # nothing off the completion (the prompt, token 0)
        assert r["advantages"][~r["completion_mask"]].abs().sum() == 0
        assert r["advantages"].shape == r["input_ids"].shape
    assert metrics["reward"] == 0.0 and metrics["reward_std"] == pytest.approx(math.sqrt(2))
    assert metrics["kl"] == pytest.approx(0.0)  # (0.5 + 0 - 0.5 + 0 + 0) / 5
    assert metrics["completions/mean_length"] == 2.5
    assert "frac_reward_zero_std" not in metrics  # one sample per prompt: no groups


def test_whitened_over_the_whole_batch_not_per_prompt():
    """2 prompts x 2 samples, one completion token each, kl_coef 0: G = the scores
    [1, 3, 10, 10]; mean 6, deviations [-5, -3, 4, 4], unbiased variance 66 / 3 = 22.
    Per-prompt normalisation would give [-1, 1, 0, 0] (scaled) instead."""
    rows = [row(2, [-1.0], [-1.0]) for _ in range(4)]
    advantages, metrics = advantages_of(rows, [1.0, 3.0, 10.0, 10.0], reference=False,
                                        kl_coef=0.0, num_generations=2)
    assert advantages == pytest.approx([d / math.sqrt(22 + 1e-8) for d in [-5, -3, 4, 4]])
    assert metrics["frac_reward_zero_std"] == 0.5  # prompt 2's scores are all equal
    assert "kl" not in metrics


def test_baseline_subtracts_each_prompts_mean_first():
    """REINFORCE++-baseline, same rollout: scores minus their prompt's mean, [-1, 1, 0, 0];
    mean 0, unbiased variance 2 / 3."""
    rows = [row(2, [-1.0], [-1.0]) for _ in range(4)]
    advantages, _ = advantages_of(rows, [1.0, 3.0, 10.0, 10.0], reference=False, kl_coef=0.0,
                                  num_generations=2, baseline=True)
    assert advantages == pytest.approx([d / math.sqrt(2 / 3 + 1e-8) for d in [-1, 1, 0, 0]])


def test_statistics_are_those_of_every_process():
    """Two processes holding the same rows: the whitening sees 10 tokens, not 5 (the
    unbiased variance changes with the count), and the metrics the gathered batch."""
    rows = [row(1, [-1.0, -1.0, -1.0], [-1.5, -1.0, -0.5]), row(3, [-2.0, -2.0], [-2.0, -2.0])]
    two = SimpleNamespace(num_processes=2, process_index=0, device="cpu",
                          reduce=lambda t, reduction: 2 * t, gather=lambda t: torch.cat([t, t]))
    advantages, metrics = advantages_of(rows, [1.0, -1.0], two, kl_coef=0.1, gamma=0.5)
    returns = [0.2125, 0.525, 1.05, -0.5, -1.0]
    mean, var = 0.0575, 2 * 2.65675 / 9
    assert advantages == pytest.approx([(g - mean) / math.sqrt(var + 1e-8) for g in returns])
    assert metrics["reward_std"] == pytest.approx(math.sqrt(4 / 3))  # [1, -1, 1, -1]


def test_first_update_of_each_rollout_has_ratio_one(tmp_path, tiny_model_dir, prompts,
                                                    monkeypatch):
    """Every rollout's first micro-batches read the policy that sampled them: ratio exactly
    1, nothing clipped; later updates of the rollout see a moved policy."""
    seen = []
    original = rpp_module.grpo_policy_loss

    def spy(token_logps, old_token_logps, advantages, mask, **kw):
        losses, stats = original(token_logps, old_token_logps, advantages, mask, **kw)
        assert advantages.shape == mask.shape  # per-token advantages
        gap = ((token_logps - old_token_logps) * mask).abs().max().item()
        seen.append({"gap": gap, **{k: float(v) for k, v in stats.items()}})
        return losses, stats

    monkeypatch.setattr(rpp_module, "grpo_policy_loss", spy)
    result = run_reinforce_pp(config(tmp_path, tiny_model_dir, prompts, batch_size=2,
                                     grad_accum=2, num_generations=2, num_iterations=2,
                                     num_mini_batches=2, kl_coef=0.1), scorer=letter_e)
    # Per rollout: 2 x 2 x 2 prompts x 2 samples = 16 rows, 4 rows per update: 4 updates
    # per pass (num_mini_batches x num_generations), 2 passes, 2 micro-batches each.
    per_rollout = 4 * 2 * 2
    assert len(seen) == 2 * per_rollout
    for first in (seen[0], seen[1], seen[per_rollout], seen[per_rollout + 1]):
        assert first["gap"] == 0.0
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert first[key] == 0.0, key
    assert any(m["gap"] > 0 for m in seen[2:per_rollout])
    kl = [h["kl"] for h in result.history]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] != 0  # the policy left the reference


def fake_model(input_ids, attention_mask, completion_mask, temperature=1.0, stats=False):
    """Token log-probs as a fixed function of the ids, on the completion tokens."""
    mask = completion_mask.bool() & attention_mask.bool()
    mask[:, 0] = False
    logps = -0.1 * input_ids.float() * mask
    return SimpleNamespace(token_logps=logps, mask=mask, entropy=torch.zeros_like(logps))


def test_micro_batches_weighted_by_units_equal_one_batch():
    """Trainer.step weights micro-batch k by units_k / sum(units): the accumulated loss is
    the token mean over the whole update, as one batch of every row gives."""
    algo = ReinforcePP(ReinforcePPConfig(model="m"), 0, ONE_PROCESS)
    rows = []
    for i, n in enumerate([1, 5, 2, 6]):  # completions of unequal lengths
        r = row(3, [-0.1 * (i + 1)] * n, [0.0] * n)
        r["old_token_logps"] = -0.12 * r["input_ids"].float()
        r["advantages"] = torch.linspace(-1, 1, 3 + n) * (i - 1.5)
        rows.append(r)
    whole, _ = algo.compute_loss(fake_model, algo.collate(rows))
    parts = [rows[:2], rows[2:]]
    units = [algo.units(p) for p in parts]
    assert units == [6.0, 8.0]
    accumulated = sum(algo.compute_loss(fake_model, algo.collate(p))[0] * u / sum(units)
                      for p, u in zip(parts, units))
    assert accumulated.item() == pytest.approx(whole.item(), rel=1e-6)


def test_reinforce_pp_raises_the_reward(tmp_path, tiny_model_dir, prompts):
    """Full fine-tuning (a random model's LM head must move); the mean reward rises."""
    result = run_reinforce_pp(config(tmp_path, tiny_model_dir, prompts, max_steps=12, lora_r=0,
                                     learning_rate=3e-3, batch_size=8, num_generations=4),
                              scorer=letter_e)
    rewards = [r["reward"] for r in result.history]
    early, late = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert late > early + 0.05, rewards
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "loss"):
        assert key in result.history[-1], key
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, prompts):
    """The baseline variant, with a reference (LoRA: adapters off)."""
    assert_resume_equals_uninterrupted(run_reinforce_pp, config, tmp_path, tiny_model_dir,
                                       prompts, letter_e, num_generations=2, batch_size=2,
                                       grad_accum=2, kl_coef=0.1, baseline=True)


def test_help_lists_the_reinforce_pp_section(capsys):
    code, out, _ = run_cli(capsys, ["reinforce-pp", "--help"])
    assert code == 0
    assert "\nreinforce-pp:\n" in out
    for flag in ("--num-generations", "--baseline", "--kl-coef", "--kl-estimator", "--gamma",
                 "--epsilon", "--epsilon-high", "--num-iterations", "--num-mini-batches",
                 "--reward-fn", "--reward-model"):
        assert flag in out, flag


@pytest.mark.parametrize("flags, field", [
    (["--baseline"], "num_generations"),  # one sample per prompt has no group mean
    (["--baseline", "--num-generations", "2", "--gamma", "0.9"], "gamma"),
    (["--gamma", "0"], "gamma"),
    (["--kl-coef", "-1"], "kl_coef"),
    (["--kl-estimator", "k9"], "kl_estimator"),
    (["--num-mini-batches", "0"], "num_mini_batches"),
    (["--temperature", "0"], "temperature"),
])
def test_bad_options_are_refused_in_one_line(capsys, tmp_path, flags, field):
    code, _, err = run_cli(capsys, ["reinforce-pp", "--model", "m", "--data", "d",
                                    "--reward-fn", "x", "--output-dir", tmp_path / "o", *flags])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert field in err and "Traceback" not in err
