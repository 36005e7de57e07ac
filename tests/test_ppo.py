"""PPO end to end on a tiny model with a rule-based reward; the first update's ratio is 1."""

import dataclasses
import json

import pytest
import torch

from helpers import letter_e, write_review_prompts
from prefalign.algorithms.ppo import PPO, PPOConfig, run_ppo


@pytest.fixture
def prompts(tmp_path):
    return write_review_prompts(tmp_path)


def config(tmp_path, model_dir, data, **kw):
    base = dict(model=str(model_dir), data=data, output_dir=str(tmp_path / "out"), batch_size=8,
                grad_accum=1, max_steps=2, learning_rate=5e-3, lora_r=8, logging_steps=1,
                warmup_ratio=0.0, max_new_tokens=8, temperature=1.0, ppo_epochs=2, seed=3,
                lr_scheduler="constant")
    base.update(kw)
    return PPOConfig(**base)


def test_first_update_has_ratio_one_and_zero_approxkl(tmp_path, tiny_model_dir, prompts,
                                                      monkeypatch):
    seen = []
    original = PPO.compute_loss

    def spy(self, model, batch):
        loss, metrics = original(self, model, batch)
        seen.append({k: float(v) for k, v in metrics.items()})
        return loss, metrics

    monkeypatch.setattr(PPO, "compute_loss", spy)
    run_ppo(config(tmp_path, tiny_model_dir, prompts, max_steps=1, grad_accum=2, batch_size=4),
            scorer=letter_e)
    first = seen[0]
    assert first["policy/ratio"] == 1.0
    assert first["policy/approxkl"] == 0.0 and first["policy/clipfrac"] == 0.0
    # Later updates see a moved policy.
    assert any(m["policy/approxkl"] > 0 for m in seen[2:])


def test_ppo_raises_the_score_with_bounded_kl(tmp_path, tiny_model_dir, prompts):
    """Full fine-tuning (a random model's LM head must move); the score about doubles."""
    result = run_ppo(config(tmp_path, tiny_model_dir, prompts, max_steps=20, kl_coef=0.02,
                            ppo_epochs=4, lora_r=0, learning_rate=3e-3, batch_size=16),
                     scorer=letter_e)
    scores = [r["objective/scores"] for r in result.history]
    early, late = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert late > early + 0.03, scores
    kls = [r["objective/kl"] for r in result.history]
    assert max(kls) < 10, kls
    out = tmp_path / "out"
    for key in ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
                "policy/approxkl", "policy/clipfrac", "policy/loss", "val/loss", "val/clipfrac",
                "val/explained_variance", "kl_coef", "response_length"):
        assert key in result.history[-1], key
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "response", "score"} <= set(samples[0])
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "value_head.safetensors").is_file()


def test_adaptive_kl_and_resume_equal_uninterrupted(tmp_path, tiny_model_dir, prompts):
    import shutil

    full = run_ppo(config(tmp_path / "a", tiny_model_dir, prompts, max_steps=4, target_kl=0.5),
                   scorer=letter_e)
    part_cfg = config(tmp_path / "b", tiny_model_dir, prompts, max_steps=4, target_kl=0.5,
                      save_steps=2)
    run_ppo(part_cfg, scorer=letter_e)
    out = tmp_path / "b" / "out"
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    resumed = run_ppo(dataclasses.replace(part_cfg, resume=True), scorer=letter_e)
    assert [r["step"] for r in resumed.history] == [3, 4]
    for a, b in zip(full.history[2:], resumed.history):
        for key in ("objective/scores", "objective/kl", "kl_coef", "loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert full.history[1]["kl_coef"] != full.history[0]["kl_coef"]  # the controller moved


def test_missing_reward_is_a_config_error(tmp_path, tiny_model_dir, prompts):
    from prefalign.errors import ConfigError

    with pytest.raises(ConfigError, match="reward_model"):
        run_ppo(config(tmp_path, tiny_model_dir, prompts))


def test_reward_fn_by_import_path(tmp_path, tiny_model_dir, prompts, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompt, response):\n    return -len(response) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_ppo(config(tmp_path, tiny_model_dir, prompts, max_steps=1,
                            reward_fn="my_rewards:short"))
    assert result.history[0]["objective/scores"] < 0
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))
