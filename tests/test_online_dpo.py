"""Online DPO: the loss, its gradient and metrics against TRL 1.16's OnlineDPOTrainer on the
same pairs, the ranking rule, and end to end on a tiny model (the reward rises, resume
equals an uninterrupted run, the CLI)."""

import math
import warnings
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
from prefalign.algorithms.online_dpo import (
    JudgeRanking,
    OnlineDPO,
    OnlineDPOConfig,
    rank_pairs,
    run_online_dpo,
)
from prefalign.algorithms.onpolicy import Rollout

trl = pytest.importorskip("trl")
with warnings.catch_warnings():  # trl.experimental warns on import that it may change
    warnings.simplefilter("ignore")
    from trl.experimental.online_dpo import OnlineDPOTrainer

N, T, EOS = 4, 5, 9  # prompts, completion positions, the EOS id of the TRL side
ONE = SimpleNamespace(num_processes=1, process_index=0)


@pytest.fixture
def prompts(tmp_path):
    return write_review_prompts(tmp_path)


config = partial(on_policy_config, OnlineDPOConfig)


# -- the same pairs through TRL's OnlineDPOTrainer.training_step and through ours ---------

def pairs(seed=5):
    """2N samples in TRL's order (sample 0 of every prompt, then sample 1): per-token
    log-probs of policy and reference, completion lengths, scores and EOS flags chosen so
    that one pair ties and the EOS penalty flips another."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5, 1, 4])
    mask = torch.arange(T) < lengths[:, None]
    ref = torch.where(mask, -torch.rand(2 * N, T, generator=g) * 3, 0.0)
    logps = torch.where(mask, ref + torch.randn(2 * N, T, generator=g) * 0.5, 0.0)
    # prompt:        0     1     2 (tie)  3: sample 0 higher but without EOS
    scores = torch.tensor([1.0, 0.2, 0.3, 0.8,  # sample 0 of prompts 0..3
                           0.5, 0.9, 0.3, 0.1])  # sample 1
    finished = torch.tensor([True, True, True, False, True, True, True, True])
    return logps, ref, mask, scores, finished


def trl_step(logps, ref, mask, scores, finished, loss_type, beta, penalty):
    """TRL's real training_step on these tensors: generation, forward passes and reward
    functions replaced by the tensors; it backpropagates into `logps`."""
    obj = object.__new__(OnlineDPOTrainer)
    completion_ids = torch.where(mask, 1, 0)
    for i in torch.nonzero(finished).flatten().tolist():
        completion_ids[i, int(mask[i].sum()) - 1] = EOS  # the last token is EOS
    seen = {}
    obj.__dict__.update(
        args=SimpleNamespace(use_vllm=False, missing_eos_penalty=penalty, loss_type=loss_type,
                             torch_empty_cache_steps=None, optim="adamw_torch", n_gpu=1,
                             gradient_accumulation_steps=1),
        _beta=beta, eos_token_ids=[EOS], ref_model="ref", reward_funcs=[letter_e],
        state=SimpleNamespace(global_step=0),
        processing_class=SimpleNamespace(batch_decode=lambda ids, **k: ["x"] * len(ids)),
        accelerator=SimpleNamespace(gather_for_metrics=lambda t: t,
                                    backward=lambda loss: (seen.update(loss=loss), loss.backward())),
        stats={key: [] for key in ("objective/kl", "objective/entropy", "objective/non_score_reward",
                                   "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                   "rewards/margins", "logps/chosen", "logps/rejected",
                                   "val/contain_eos_token", "beta", "objective/rlhf_reward",
                                   "objective/scores_margin", "objective/scores")})
    ones = torch.ones(2 * N, 1, dtype=torch.long)
    obj._generate = lambda model, prompts, images=None: (ones, ones, completion_ids,
                                                         mask.long(), None)
    obj._forward = lambda model, *a, **k: ref if model == "ref" else logps
    obj._calculate_rewards_from_functions = lambda **k: scores.clone()
    obj.training_step(SimpleNamespace(train=lambda: None), {"prompt": [f"p{i}" for i in range(N)]})
    return seen["loss"], {k: v[0] for k, v in obj.stats.items()}


def our_step(logps, ref, mask, scores, finished, loss_type, beta, penalty):
    """Ours through advantages -> collate -> compute_loss. Sample j of TRL's order is our
    rollout row 2k + s (prompt k, sample s); its first token carries j, which the stand-in
    model reads to return row j of `logps`."""
    cfg = OnlineDPOConfig(model="m", loss_type=loss_type, beta=beta, missing_eos_penalty=penalty)
    algo = OnlineDPO(cfg, 0, ONE, reference=None)
    rows, order = [], [j for k in range(N) for j in (k, N + k)]
    for j in order:
        n = int(mask[j].sum())
        rows.append({"input_ids": torch.tensor([j] + [1] * n),
                     "attention_mask": torch.ones(n + 1, dtype=torch.long),
                     "completion_mask": torch.arange(n + 1) >= 1,
                     "finished": bool(finished[j]),
                     "ref_token_logps": torch.cat([torch.zeros(1), ref[j, :n]])})
    rollout = Rollout([{"prompt": f"p{j % N}"} for j in order], ["x"] * 2 * N, rows,
                      scores[order])
    metrics = algo.advantages(rollout)

    def model(input_ids, attention_mask, completion_mask):
        keep = completion_mask.bool()
        picked = logps[input_ids[:, 0], : keep.shape[1] - 1]  # (2N, width - 1), with grad
        token_logps = torch.where(keep, torch.cat([torch.zeros(len(picked), 1), picked], 1), 0.0)
        return SimpleNamespace(token_logps=token_logps, mask=keep, logps=token_logps.sum(-1))

    loss, step_metrics = algo.compute_loss(model, algo.collate(rollout.rows))
    loss.backward()
    return loss, {**metrics, **{k: float(v) for k, v in step_metrics.items()}}


@pytest.mark.parametrize("penalty", [None, 1.0])
@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.1), ("ipo", 0.7)])
def test_loss_gradient_and_metrics_equal_trl(loss_type, beta, penalty):
    logps, ref, mask, scores, finished = pairs()
    theirs_in, ours_in = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    theirs, trl_metrics = trl_step(theirs_in, ref, mask, scores, finished, loss_type, beta, penalty)
    ours, metrics = our_step(ours_in, ref, mask, scores, finished, loss_type, beta, penalty)
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert ours_in.grad.abs().sum() > 0
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-5, rtol=0)
    for key, value in trl_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key


def test_ranking_prefers_the_higher_score_and_the_first_on_a_tie():
    scores = torch.tensor([1.0, 0.5, 0.2, 0.9, 0.3, 0.3])
    finished = torch.ones(6, dtype=torch.bool)
    chosen, rejected, penalised = rank_pairs(scores, finished, None)
    assert chosen.tolist() == [0, 3, 4] and rejected.tolist() == [1, 2, 5]
    torch.testing.assert_close(penalised, scores)


def test_missing_eos_penalty_flips_a_pair_only_when_it_outweighs_the_gap():
    scores = torch.tensor([1.0, 0.5, 1.0, 0.5])
    finished = torch.tensor([False, True, False, True])  # both first samples lack EOS
    chosen, _, penalised = rank_pairs(scores, finished, 0.6)
    assert chosen.tolist() == [1, 3]  # 1.0 - 0.6 < 0.5
    torch.testing.assert_close(penalised, torch.tensor([0.4, 0.5, 0.4, 0.5]))
    assert rank_pairs(scores, finished, 0.4)[0].tolist() == [0, 2]  # 0.6 > 0.5: kept
    assert rank_pairs(scores, finished, None)[0].tolist() == [0, 2]


def test_advantages_make_one_row_per_ranked_pair():
    algo = OnlineDPO(OnlineDPOConfig(model="m", missing_eos_penalty=1.0), 0, ONE, None)
    rows = [{"completion_mask": torch.tensor([False, True]), "finished": f, "id": i}
            for i, f in enumerate([True, True, False, True])]
    rollout = Rollout([{"prompt": p} for p in "aabb"], ["x"] * 4, rows,
                      torch.tensor([0.1, 0.7, 0.9, 0.2]))
    metrics = algo.advantages(rollout)
    assert [(p["chosen"]["id"], p["rejected"]["id"]) for p in rollout.rows] == [(1, 0), (3, 2)]
    assert metrics["objective/scores"] == pytest.approx((0.1 + 0.7 - 0.1 + 0.2) / 4)
    assert metrics["objective/scores_margin"] == pytest.approx((0.6 + 0.3) / 2)
    assert metrics["val/contain_eos_token"] == 0.75


class LetterJudge:
    """Prefers the response with more 'e's, says "tie" on equal counts; `biased` always
    answers "0" (the first shown), a verdict that flips with the order."""

    name, settings = "letters", {}

    def __init__(self, biased=False):
        self.biased = biased

    def __call__(self, texts, attempt):
        answers = []
        for text in texts:
            a = text.split("Response 0:\n")[1].split("\n\nResponse 1:")[0]
            b = text.split("Response 1:\n")[1].split("\n\nAnswer")[0]
            ea, eb = a.count("e"), b.count("e")
            answers.append("0" if self.biased or ea > eb else "1" if ea < eb else "tie")
        return answers


def test_judge_ranks_each_pair_or_leaves_it_unranked():
    """The engine reads a scorer's reward_terms: None (no verdict) becomes NaN there."""
    responses = ["eee", "e", "a", "ee", "ab", "ba", "same", "same"]
    scores = JudgeRanking(LetterJudge()).reward_terms(["p"] * 8, responses).total()
    assert scores[:4] == [1.0, 0.0, 0.0, 1.0]
    assert all(math.isnan(x) for x in scores[4:])  # a tie; identical responses
    flipped = JudgeRanking(LetterJudge(biased=True)).reward_terms(["p"] * 2, ["eee", "e"])
    assert all(math.isnan(x) for x in flipped.total())  # "0" both ways: a position flip


def fake_model(input_ids, attention_mask, completion_mask):
    """Token log-probs as a fixed function of the ids, on the completion tokens."""
    mask = completion_mask.bool()
    token_logps = torch.where(mask, -0.1 * input_ids.float(), 0.0)
    return SimpleNamespace(token_logps=token_logps, mask=mask, logps=token_logps.sum(-1))


def test_unranked_pairs_are_left_out_of_the_loss():
    algo = OnlineDPO(OnlineDPOConfig(model="m", judge="j"), 0, ONE, None)
    rows = []
    for i in range(6):
        ids = torch.tensor([1, 2 + i, 3 + 2 * i])
        rows.append({"input_ids": ids, "attention_mask": torch.ones(3, dtype=torch.long),
                     "completion_mask": torch.tensor([False, True, True]), "finished": True,
                     "ref_token_logps": torch.tensor([0.0, -0.5, -0.3 * i])})
    nan = math.nan
    scores = torch.tensor([0.0, 1.0, nan, nan, 1.0, 0.0])
    rollout = Rollout([{"prompt": p} for p in "aabbcc"], ["x"] * 6, rows, scores)
    metrics = algo.advantages(rollout)
    assert metrics["val/ranked_pairs"] == pytest.approx(2 / 3)
    assert "objective/scores" not in metrics
    assert [p["keep"] for p in rollout.rows] == [True, False, True]
    assert algo.units(rollout.rows) == 2
    loss, stats = algo.compute_loss(fake_model, algo.collate(rollout.rows))
    kept = [rollout.rows[0], rollout.rows[2]]
    alone, alone_stats = algo.compute_loss(fake_model, algo.collate(kept))
    assert loss.item() == pytest.approx(alone.item(), abs=1e-7)
    assert stats["rewards/margins"].item() == pytest.approx(alone_stats["rewards/margins"].item())


# -- end to end -----------------------------------------------------------------------------

def test_first_step_reads_the_reference_at_temperature_one(tmp_path, tiny_model_dir, prompts):
    """LoRA starts as the reference: with sampling at 0.7, the first update's KL and
    implicit rewards are still 0, since the loss and the reference both read the model's
    own (temperature 1) log-probs."""
    result = run_online_dpo(config(tmp_path, tiny_model_dir, prompts, max_steps=2,
                                   temperature=0.7), scorer=letter_e)
    first, second = result.history
    for key in ("objective/kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-5, key
    assert abs(second["objective/kl"]) > 1e-5
    assert first["beta"] == pytest.approx(0.1)


def test_online_dpo_raises_the_reward(tmp_path, tiny_model_dir, prompts):
    """Full fine-tuning of a random tiny model (its LM head must move); the mean score rises."""
    result = run_online_dpo(config(tmp_path, tiny_model_dir, prompts, max_steps=12, lora_r=0,
                                   learning_rate=1e-2, batch_size=8, beta=0.1), scorer=letter_e)
    scores = [r["objective/scores"] for r in result.history]
    early, late = sum(scores[:2]) / 2, sum(scores[-2:]) / 2
    assert late > early + 0.05, scores
    for key in ("objective/kl", "objective/entropy", "objective/scores",
                "objective/scores_margin", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                "val/contain_eos_token", "beta", "loss"):
        assert key in result.history[-1], key
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, prompts):
    assert_resume_equals_uninterrupted(run_online_dpo, config, tmp_path, tiny_model_dir, prompts,
                                       letter_e, batch_size=2, grad_accum=2,
                                       missing_eos_penalty=0.5)


def test_a_local_judge_model_ranks_the_pairs(tmp_path, tiny_model_dir, prompts):
    """The tiny model as the judge, offline: it rarely answers 0/1 in both orders, so most
    pairs stay unranked; the run completes and logs the ranked share, not scores."""
    result = run_online_dpo(config(tmp_path, tiny_model_dir, prompts, max_steps=1, batch_size=2,
                                   max_new_tokens=4, judge=str(tiny_model_dir)))
    record = result.history[0]
    assert 0.0 <= record["val/ranked_pairs"] <= 1.0
    assert "objective/scores" not in record


def test_judged_pairs_train(tmp_path, tiny_model_dir, prompts, monkeypatch):
    """--judge DIR with the judge model replaced by LetterJudge: ranked pairs reach the loss."""
    from prefalign.preferences import local_judge

    monkeypatch.setattr(local_judge, "LocalJudge", lambda path, seed: LetterJudge())
    result = run_online_dpo(config(tmp_path, tiny_model_dir, prompts, max_steps=2,
                                   judge=str(tiny_model_dir)))
    assert all(r["val/ranked_pairs"] > 0 for r in result.history)
    assert result.history[1]["rewards/margins"] != 0  # the second update saw a moved policy
    assert "objective/scores" not in result.history[0]


def test_help_lists_the_online_dpo_section(capsys):
    code, out, _ = run_cli(capsys, ["online-dpo", "--help"])
    assert code == 0
    assert "\nonline_dpo:\n" in out
    for flag in ("--reward-model", "--reward-fn", "--missing-eos-penalty", "--loss-type",
                 "--beta", "--label-smoothing", "--judge"):
        assert flag in out, flag


@pytest.mark.parametrize("flags,field", [
    (["--beta", "0"], "beta"),
    (["--missing-eos-penalty", "-1"], "missing_eos_penalty"),
    (["--loss-type", "simpo"], "loss_type"),
    (["--loss-type", "ipo", "--label-smoothing", "0.1"], "label_smoothing"),
    (["--temperature", "0"], "temperature"),
    (["--judge", "j"], "judge"),
])
def test_bad_options_are_refused_in_one_line(capsys, tmp_path, flags, field):
    code, _, err = run_cli(capsys, ["online-dpo", "--model", "m", "--data", "d",
                                    "--reward-model", "x", "--output-dir", tmp_path / "o", *flags])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert field.replace("_", "-") in err or field in err, err
    assert "Traceback" not in err


def test_a_missing_judge_directory_is_refused_in_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["online-dpo", "--model", "m", "--data", "d", "--judge",
                                    tmp_path / "nowhere", "--output-dir", tmp_path / "o"])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "judge" in err and "nowhere" in err and "Traceback" not in err
