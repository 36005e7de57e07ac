"""GRPO end to end on a tiny model with a rule-based reward: the first update's ratio is 1,
groups stay together, the reward rises, resume equals an uninterrupted run, the CLI."""

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
from prefalign.algorithms import grpo as grpo_module
from prefalign.algorithms.grpo import GRPO, GRPOConfig, run_grpo
from prefalign.algorithms.onpolicy import Rollout
from prefalign.errors import ConfigError


@pytest.fixture
def prompts(tmp_path):
    return write_review_prompts(tmp_path)


config = partial(on_policy_config, GRPOConfig, temperature=1.0, num_generations=4)


def test_first_update_of_each_rollout_has_ratio_one(tmp_path, tiny_model_dir, prompts,
                                                    monkeypatch):
    """Every rollout's first micro-batch reads the policy that sampled it: ratio exactly 1,
    no clipping; later updates of the rollout see a moved policy."""
    seen = []
    original = grpo_module.grpo_policy_loss

    def spy(token_logps, old_token_logps, advantages, mask, **kw):
        losses, stats = original(token_logps, old_token_logps, advantages, mask, **kw)
        gap = ((token_logps - old_token_logps) * mask).abs().max().item()
        seen.append({"gap": gap, **{k: float(v) for k, v in stats.items()}})
        return losses, stats

    monkeypatch.setattr(grpo_module, "grpo_policy_loss", spy)
    run_grpo(config(tmp_path, tiny_model_dir, prompts, max_steps=2, batch_size=2, grad_accum=2,
                    beta=0.1, num_iterations=2), scorer=letter_e)
    # Per rollout: G * num_iterations updates of grad_accum micro-batches each.
    per_rollout = 4 * 2 * 2
    assert len(seen) == 2 * per_rollout
    assert seen[0]["kl"] == 0.0  # the reference (adapters off) is the starting policy
    assert seen[per_rollout]["kl"] > 0  # and the second rollout's policy has moved from it
    # Both micro-batches of the first update, of each rollout.
    for first in (seen[0], seen[1], seen[per_rollout], seen[per_rollout + 1]):
        assert first["gap"] == 0.0
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert first[key] == 0.0, key
    assert any(m["gap"] > 0 for m in seen[2:per_rollout])


def test_g_rows_of_one_prompt_share_one_group():
    """Rows come as G consecutive samples per prompt; each group is centred on its own mean."""
    cfg = GRPOConfig(model="m", num_generations=3, scale_rewards="none")
    acc = SimpleNamespace(num_processes=1, process_index=0)
    algo = GRPO(cfg, 0, acc)
    rows = [{"completion_mask": torch.tensor([False, True, True]), "finished": True}
            for _ in range(6)]
    rollout = Rollout([{"prompt": p} for p in "aaabbb"], ["x"] * 6, rows,
                      torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]))
    metrics = algo.advantages(rollout)
    assert [r["advantages"] for r in rows] == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert metrics["frac_reward_zero_std"] == pytest.approx(0.5)
    assert metrics["reward"] == pytest.approx(3.5)
    assert metrics["completions/mean_length"] == 2.0
    assert metrics["completions/clipped_ratio"] == 0.0


def fake_model(input_ids, attention_mask, completion_mask, temperature=1.0, stats=False):
    """Token log-probs as a fixed function of the ids, on the completion tokens."""
    mask = completion_mask.bool() & attention_mask.bool()
    mask[:, 0] = False
    return SimpleNamespace(token_logps=-0.1 * input_ids.float() * mask, mask=mask,
                           entropy=torch.zeros(mask.shape))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_micro_batches_weighted_by_units_equal_one_batch(loss_type):
    """Trainer.step weights micro-batch k by units_k / sum(units): for dapo that must give
    the token sum over the whole update's tokens, for the others the mean over rows."""
    cfg = GRPOConfig(model="m", num_generations=2, loss_type=loss_type, max_new_tokens=6)
    algo = GRPO(cfg, 0, SimpleNamespace(num_processes=1, process_index=0))
    rows = []
    for i, n in enumerate([1, 5, 2, 6]):  # completions of unequal lengths
        ids = torch.arange(3 + n) + i
        rows.append({"input_ids": ids, "attention_mask": torch.ones(3 + n, dtype=torch.long),
                     "completion_mask": torch.arange(3 + n) >= 3, "finished": True,
                     "old_token_logps": -0.12 * ids.float(), "advantages": float(i) - 1.5})
    whole, _ = algo.compute_loss(fake_model, algo.collate(rows))
    parts = [rows[:2], rows[2:]]
    units = [algo.units(p) for p in parts]
    accumulated = sum(algo.compute_loss(fake_model, algo.collate(p))[0] * u / sum(units)
                      for p, u in zip(parts, units))
    if loss_type == "bnpo":  # TRL's bnpo: a token mean per micro-batch, then averaged
        assert accumulated != pytest.approx(whole.item())
    else:
        assert accumulated.item() == pytest.approx(whole.item(), rel=1e-6)


def test_grpo_raises_the_reward(tmp_path, tiny_model_dir, prompts):
    """Full fine-tuning (a random model's LM head must move); the mean reward rises."""
    result = run_grpo(config(tmp_path, tiny_model_dir, prompts, max_steps=12, lora_r=0,
                             learning_rate=3e-3, batch_size=8), scorer=letter_e)
    rewards = [r["reward"] for r in result.history]
    early, late = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert late > early + 0.05, rewards
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "loss"):
        assert key in result.history[-1], key
    assert "kl" not in result.history[-1]  # beta 0: no reference, no KL
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, prompts):
    """dapo (the default): its loss units are tokens, weighted over each update."""
    assert_resume_equals_uninterrupted(run_grpo, config, tmp_path, tiny_model_dir, prompts,
                                       letter_e, num_generations=2, batch_size=2, grad_accum=2)


def test_help_lists_the_grpo_section(capsys):
    code, out, _ = run_cli(capsys, ["grpo", "--help"])
    assert code == 0
    assert "\ngrpo:\n" in out
    for flag in ("--num-generations", "--loss-type", "--epsilon-high", "--scale-rewards",
                 "--importance-sampling-level", "--num-iterations",
                 "--mask-truncated-completions", "--reward-fn", "--reward-model", "--beta"):
        assert flag in out, flag


def test_one_generation_is_refused_in_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["grpo", "--model", "m", "--data", "d", "--reward-fn", "x",
                                    "--output-dir", tmp_path / "o", "--num-generations", "1"])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "num_generations" in err and "Traceback" not in err


def test_unscorable_samples_leave_the_baseline_with_advantage_zero():
    """TRL: a sample no reward function scored (NaN) is out of its group's mean and std and
    gets advantage 0; reward and reward_std are over the scored samples. Group [1, nan, 3]
    (scale none): mean 2 -> [-1, 0, 1]; group [2, 2, 5]: mean 3 -> [-1, -1, 2].
    reward = mean(1, 3, 2, 2, 5) = 2.6; reward_std = sample std of those = sqrt(2.3)."""
    cfg = GRPOConfig(model="m", num_generations=3, scale_rewards="none")
    algo = GRPO(cfg, 0, SimpleNamespace(num_processes=1, process_index=0))
    rows = [{"completion_mask": torch.tensor([False, True]), "finished": True} for _ in range(6)]
    scores = torch.tensor([1.0, float("nan"), 3.0, 2.0, 2.0, 5.0])
    metrics = algo.advantages(Rollout([{"prompt": "p"}] * 6, ["x"] * 6, rows, scores))
    assert [r["advantages"] for r in rows] == [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]
    assert metrics["reward"] == pytest.approx(2.6)
    assert metrics["reward_std"] == pytest.approx(2.3 ** 0.5)


def entropy_rows(vocab, lengths=(6, 9, 4, 7), prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(n, dtype=torch.long),
                     "completion_mask": torch.arange(n) >= prompt, "finished": i != 1,
                     "old_token_logps": torch.zeros(n), "advantages": 1.0 - i})
    return rows


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_entropy_metric_equals_softmax_entropy_of_the_loss_tokens(make_model, chunk_size):
    """`entropy`: the mean over the loss's completion tokens of -sum_v p log p, p the
    softmax of the tempered logits, read off the update's own forward (chunked too);
    the truncated completion (row 1) is masked out of the loss and of the mean."""
    from prefalign.logprobs import LogpsModel, position_ids_from_mask

    model = make_model("llama")
    cfg = GRPOConfig(model="m", num_generations=2, temperature=0.7,
                     mask_truncated_completions=True)
    algo = GRPO(cfg, 0, SimpleNamespace(num_processes=1, process_index=0))
    batch = algo.collate(entropy_rows(model.config.vocab_size))
    _, stats = algo.compute_loss(LogpsModel(model, chunk_size=chunk_size), batch)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=position_ids_from_mask(batch.attention_mask)).logits
    logp = torch.log_softmax(logits[:, :-1].float() / 0.7, -1)
    token_entropy = -(logp.exp() * logp).sum(-1)  # predicts token t + 1
    mask = (batch.completion_mask & batch.attention_mask.bool())[:, 1:].clone()
    mask[1] = False  # truncated
    expected = token_entropy[mask].mean()
    assert float(stats["entropy"]) == pytest.approx(float(expected), abs=1e-5)


def grpo_trainer(tokenizer, model, cfg):
    from prefalign.algorithms.onpolicy import OnPolicyTrainer
    from prefalign.logprobs import LogpsModel

    algo = GRPO(cfg, tokenizer.pad_token_id, SimpleNamespace(num_processes=1, process_index=0))
    trainer = OnPolicyTrainer(cfg, LogpsModel(model), algo, [{"prompt": "p"}], policy=model,
                              tokenizer=tokenizer, scorer=letter_e)
    algo.accelerator = trainer.accelerator
    return trainer


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_dropping_zero_std_groups_equals_the_update_on_the_informative_groups_alone(
        tmp_path, tokenizer, make_model, loss_type):
    """4 groups of 2, groups 0 and 2 with equal rewards: with drop_zero_std_groups the
    update (parameters after it) equals the update on groups 1 and 3 alone, exactly; without
    the filter the zero-advantage rows dilute the mean and the update differs."""
    rows = entropy_rows(tokenizer.vocab_size, lengths=(6, 9, 4, 7, 5, 8, 6, 7))
    for row in rows:
        del row["old_token_logps"], row["advantages"]
    scores = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0, 5.0, 1.0])
    informative = [2, 3, 6, 7]

    def updated(indices, drop):
        cfg = GRPOConfig(model="m", output_dir=str(tmp_path / f"{drop}{len(indices)}"),
                         num_generations=2, batch_size=1, grad_accum=4, loss_type=loss_type,
                         learning_rate=1e-2, drop_zero_std_groups=drop, seed=0,
                         warmup_ratio=0.0, lr_scheduler="constant")
        model = make_model("llama", seed=0)
        trainer = grpo_trainer(tokenizer, model, cfg)
        part = [dict(rows[i]) for i in indices]
        rollout = Rollout([{"prompt": "p"}] * len(part), ["x"] * len(part), part, scores[indices])
        trainer.rollout_logps(rollout)  # one row per micro-batch: the same for every run
        metrics = trainer.algorithm.advantages(rollout)
        trainer.update(rollout.rows, [0])
        return [p.detach().clone() for p in model.parameters()], metrics

    dropped, metrics = updated(list(range(8)), True)
    alone, _ = updated(informative, False)
    diluted, _ = updated(list(range(8)), False)
    assert metrics["dropped_groups"] == 2.0
    assert metrics["frac_reward_zero_std"] == 0.5
    start = [p.detach() for p in make_model("llama", seed=0).parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(alone, start))  # the update moved them
    assert all(torch.equal(a, b) for a, b in zip(dropped, alone))
    assert not all(torch.equal(a, b) for a, b in zip(diluted, alone))


def test_dropping_zero_std_groups_is_refused_under_data_parallelism():
    cfg = GRPOConfig(model="m", num_generations=2, drop_zero_std_groups=True)
    with pytest.raises(ConfigError, match="drop_zero_std_groups"):
        GRPO(cfg, 0, SimpleNamespace(num_processes=2, process_index=0))
