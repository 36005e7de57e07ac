"""The implementation guide's phase checkpoints, run against prefalign through the guide's
names (prefalign.guide) on tiny local models instead of hub downloads."""

import math

import pytest
import torch
from torch import nn

from helpers import letter_e, preference_rows, write_jsonl
from prefalign.algorithms.dpo import DPOConfig, run_dpo
from prefalign.algorithms.ppo import PPO, PPOConfig, run_ppo
from prefalign.algorithms.reward import RewardConfig, run_reward
from prefalign.guide import (
    LoRALinear,
    PreferenceDataset,
    RewardModel,
    ValueHead,
    apply_lora_to_model,
    compute_advantages,
    compute_dpo_loss,
    compute_log_probs,
    compute_preference_loss,
    find_target_modules,
    get_lora_parameters,
    merge_lora_weights,
    print_trainable_parameters,
)
from prefalign.logprobs import completion_logps
from prefalign.losses import LossParams, PairLogps, dpo_loss
from prefalign.rl import shaped_rewards
from prefalign.tiny import build_model

# A GPT-2 shape where LoRA r=16 on c_attn is the guide's "~1-3% trainable": 4 layers of
# width 256 with the test tokenizer's small vocabulary, 3.42M parameters, 65,536 of them
# LoRA (1.92%). The real 124M GPT-2 gives 0.47% at r=16 (see docs/from-the-guide.md).
GPT2_SHAPE = dict(arch="gpt2", hidden_size=256, num_layers=4, num_heads=4, max_positions=256)


# -- Phase 1: LoRA ---------------------------------------------------------------------

def test_lora_linear_starts_at_the_base_layer():
    base = nn.Linear(256, 256)
    lora = LoRALinear(base, r=16)
    assert lora.lora_A.weight.shape == (16, 256) and lora.lora_B.weight.shape == (256, 16)
    assert not lora.lora_B.weight.any()
    x = torch.randn(2, 8, 256)
    torch.testing.assert_close(lora(x), base(x), atol=1e-5, rtol=0)


def test_find_target_modules_on_gpt2(tokenizer):
    model = build_model(tokenizer, **GPT2_SHAPE)
    both = find_target_modules(model, ["c_attn", "c_proj"])
    # A bare "c_proj" also matches the MLP's output projection (mlp.c_proj).
    assert len(both) == 3 * 4 and "transformer.h.0.mlp.c_proj" in both
    assert find_target_modules(model) == [f"transformer.h.{i}.attn.{n}" for i in range(4)
                                          for n in ("c_attn", "c_proj")]


def test_c_attn_trainable_share_and_only_lora_trains(tokenizer):
    model = build_model(tokenizer, **GPT2_SHAPE)
    apply_lora_to_model(model, r=16, target_modules=["c_attn"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert (trainable, total) == (65_536, 3_421_696)  # 4 x 16 x (256 + 768)
    assert 0.01 < trainable / total < 0.03
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    params = get_lora_parameters(model)
    assert len(params) == 4 * 2 and all(p.requires_grad for p in params)


def test_phase1_checkpoint_merge_keeps_the_output(tokenizer, capsys):
    model = build_model(tokenizer, **GPT2_SHAPE)
    dummy_input = torch.randint(5, len(tokenizer), (2, 12))
    base = model(dummy_input).logits
    apply_lora_to_model(model, r=16)
    trainable, total = print_trainable_parameters(model)
    assert "trainable%" in capsys.readouterr().out and 0 < trainable < total
    torch.testing.assert_close(model(dummy_input).logits, base)  # B = 0: the base model
    with torch.no_grad():  # a trained adapter, so that merging has something to fold in
        for p in get_lora_parameters(model):
            p.normal_(0, 0.05)
    output1 = model(dummy_input).logits
    assert (output1 - base).abs().max() > 1e-3
    merge_lora_weights(model)
    output2 = model(dummy_input).logits
    torch.testing.assert_close(output2, output1, atol=1e-5, rtol=1e-5)


# -- Phase 2: data ---------------------------------------------------------------------

HH = "\n\nHuman: {q}\n\nAssistant: {a}"


@pytest.fixture
def hh_file(tmp_path):
    rows = [{"chosen": HH.format(q=f"What is {i}+{i}?", a=f"The answer is {2 * i}."),
             "rejected": HH.format(q=f"What is {i}+{i}?", a="I do not know.")} for i in range(6)]
    rows.insert(1, {"chosen": HH.format(q="Hi", a="Hello."), "rejected": HH.format(q="Hi", a="Hello.")})
    return write_jsonl(tmp_path / "hh.jsonl", rows)


def test_extract_prompt_and_response():
    text = "\n\nHuman: What is 2+2?\n\nAssistant: The answer is 4."
    prompt, response = PreferenceDataset._extract_prompt_and_response(text)
    assert "Human: What is 2+2?" in prompt
    assert response == "The answer is 4."


def test_preference_dataset_shapes_padding_and_prompt_length(tokenizer, hh_file):
    dataset = PreferenceDataset(tokenizer, hh_file, max_samples=5, max_length=48)
    assert len(dataset) == 5
    assert dataset.report.dropped["chosen equals rejected"] == 1
    assert dataset.examples[0].prompt and dataset.examples[0].chosen != dataset.examples[0].rejected
    item = dataset[0]
    assert set(item) == {"chosen_input_ids", "chosen_attention_mask", "rejected_input_ids",
                         "rejected_attention_mask", "prompt_length"}
    n = int(item["prompt_length"])
    prompt_ids = tokenizer(dataset.examples[0].prompt, add_special_tokens=False)["input_ids"]
    assert n == len(prompt_ids)
    for side in ("chosen", "rejected"):
        ids, mask = item[f"{side}_input_ids"], item[f"{side}_attention_mask"]
        assert ids.shape == mask.shape == (48,)
        real = int(mask.sum())
        assert mask[:real].all() and not mask[real:].any()  # right padding
        assert (ids[real:] == tokenizer.pad_token_id).all()
        assert ids[:n].tolist() == prompt_ids
        assert ids[real - 1] == tokenizer.eos_token_id
    assert tokenizer.decode(item["chosen_input_ids"][n:]).startswith(" The answer is 0.")
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["chosen_input_ids"].shape == (4, 48) and batch["prompt_length"].shape == (4,)


# -- Phase 3: reward model -------------------------------------------------------------

def test_compute_preference_loss_guide_example():
    """loss = mean(-log sigmoid(1.5), -log sigmoid(1.2)) = mean(0.20141, 0.26328) = 0.23235."""
    chosen = torch.tensor([2.0, 1.5])
    rejected = torch.tensor([0.5, 0.3])
    loss, metrics = compute_preference_loss(chosen, rejected)
    assert metrics["accuracy"] == 1.0
    assert loss.item() == pytest.approx(0.23235, abs=1e-4) and loss.item() < math.log(2)
    _, flipped = compute_preference_loss(rejected, chosen)
    assert flipped["accuracy"] == 0.0


def test_reward_model_gives_one_scalar(tokenizer, make_model):
    rm = RewardModel.from_causal_lm(make_model("gpt2"), tokenizer.pad_token_id)
    input_ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    reward = rm(input_ids, torch.ones_like(input_ids))
    assert reward.shape == (1,)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A reward model, a DPO policy and a PPO policy trained briefly from the tiny model."""
    root = tmp_path_factory.mktemp("guide")
    train = write_jsonl(root / "train.jsonl", preference_rows(64))
    evals = write_jsonl(root / "eval.jsonl", preference_rows(32, seed=1))
    common = dict(model=str(tiny_model_dir), batch_size=8, grad_accum=1, learning_rate=5e-3,
                  lora_r=8, lora_dropout=0.0, logging_steps=1, warmup_ratio=0.0,
                  lr_scheduler="constant", seed=7)
    reward = run_reward(RewardConfig(data=train, eval_data=evals, output_dir=str(root / "rm"),
                                     max_steps=10, eval_steps=5, **common))
    dpo = run_dpo(DPOConfig(data=train, output_dir=str(root / "dpo"), max_steps=20, beta=0.1,
                            **common))
    return {"root": root, "reward": reward, "dpo": dpo}


def test_phase3_checkpoint_reward_accuracy_climbs(runs):
    history = runs["reward"].history
    train = [h for h in history if "loss" in h]
    evals = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # a chance-level start
    assert train[-1]["loss"] < train[0]["loss"]
    assert evals[-1] >= 0.65, evals


# -- Phase 4: DPO ----------------------------------------------------------------------

def test_compute_log_probs_negative_and_longer_is_more_negative(make_model, tokenizer):
    model = make_model()
    prompt = tokenizer("Human: hi\n\nAssistant:")["input_ids"]
    reply = tokenizer(" The film was a delight from start to finish")["input_ids"]
    short, longer = prompt + reply[:3], prompt + reply
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([short + [pad] * (len(longer) - len(short)), longer])
    attention_mask = (torch.arange(len(longer)) < torch.tensor([[len(short)], [len(longer)]])).long()
    prompt_lengths = torch.tensor([len(prompt), len(prompt)])
    logps = compute_log_probs(model, input_ids, attention_mask, prompt_lengths)
    assert logps.shape == (2,) and (logps < 0).all()
    assert logps[1] < logps[0]
    completion = torch.arange(len(longer)) >= len(prompt)
    expected = completion_logps(model, input_ids, attention_mask,
                                completion.expand(2, -1) & attention_mask.bool()).logps
    torch.testing.assert_close(logps, expected)
    # Left padding: prompt lengths count real tokens, so the numbers do not change.
    left_ids = torch.tensor([[pad] * (len(longer) - len(short)) + short, longer])
    torch.testing.assert_close(
        compute_log_probs(model, left_ids, attention_mask.flip(-1), prompt_lengths), logps,
        atol=1e-4, rtol=1e-4)


def test_compute_dpo_loss():
    zeros = torch.zeros(3)
    loss, metrics = compute_dpo_loss(zeros, zeros, zeros, zeros)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["rewards/accuracies"] == 0.0 and metrics["rewards/margins"] == 0.0
    # The policy strongly prefers chosen, the reference does not: the loss is small.
    pc, pr, rc, rr = torch.tensor([-5.0, -6.0]), torch.tensor([-40.0, -50.0]), \
        torch.tensor([-20.0, -25.0]), torch.tensor([-20.0, -25.0])
    loss, metrics = compute_dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() < 0.05 and metrics["rewards/accuracies"] == 1.0
    assert metrics["rewards/chosen"] == pytest.approx(0.1 * ((15 + 19) / 2))
    expected = dpo_loss(PairLogps(pc, pr, rc, rr), LossParams(beta=0.1)).losses.mean()
    assert loss.item() == pytest.approx(expected.item())


def test_phase4_checkpoint_dpo_training(runs):
    history = runs["dpo"].history
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    late = history[-5:]
    mean = lambda key: sum(r[key] for r in late) / len(late)  # noqa: E731
    assert mean("loss") < 0.6 < history[0]["loss"]
    assert mean("rewards/accuracies") > 0.6
    # rewards/* = beta * log-ratio: chosen up from 0, rejected down from 0.
    assert mean("rewards/chosen") > 0 > mean("rewards/rejected")


# -- Phase 5: PPO ----------------------------------------------------------------------

def test_value_head_and_centred_advantages():
    head = ValueHead(16)
    values = head(torch.randn(4, 10, 16))
    assert values.shape == (4, 10) and not values.any()  # the last layer starts at zero
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, 3:] = True
    kl = 0.05 * torch.randn(4, 10, generator=g)
    rewards = shaped_rewards(torch.tensor([1.0, -0.5, 2.0, 0.0]), kl, mask, kl_coef=0.1)
    raw, returns = compute_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    assert raw[mask].abs().max() < 3  # bounded by the scores: nothing explodes
    advantages, _ = compute_advantages(rewards, values, mask, gamma=1.0, lam=0.95, whiten=True)
    assert advantages[mask].mean().abs() < 1e-5
    assert advantages[mask].std().item() == pytest.approx(1.0, abs=1e-3)
    assert not advantages[~mask].any() and not returns[~mask].any()



def ppo_config(root, model_dir, data, **kw):
    base = dict(model=str(model_dir), data=data, output_dir=str(root), batch_size=8,
                grad_accum=1, max_steps=1, learning_rate=3e-3, lora_r=0, logging_steps=1,
                warmup_ratio=0.0, max_new_tokens=6, temperature=1.0, ppo_epochs=4, seed=3,
                lr_scheduler="constant", kl_coef=0.02)
    base.update(kw)
    return PPOConfig(**base)


@pytest.fixture(scope="module")
def ppo_run(runs, tiny_model_dir):
    """PPO with a rule reward; every compute_loss call's metrics are recorded."""
    root = runs["root"]
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Review {i}: The film"}
                                                   for i in range(64)])
    seen = []
    original = PPO.compute_loss

    def spy(self, model, batch):
        loss, metrics = original(self, model, batch)
        seen.append({k: float(v) for k, v in metrics.items()})
        return loss, metrics

    PPO.compute_loss = spy
    try:
        result = run_ppo(ppo_config(root / "ppo", tiny_model_dir, prompts, max_steps=8,
                                    batch_size=16, learning_rate=5e-3), scorer=letter_e)
    finally:
        PPO.compute_loss = original
    return {"result": result, "seen": seen, "prompts": prompts}


def test_phase5_checkpoint_ratio_clipfrac_reward_and_kl(ppo_run):
    seen, history = ppo_run["seen"], ppo_run["result"].history
    assert seen[0]["policy/ratio"] == 1.0  # the same policy generated the data
    assert all("policy/clipfrac" in m for m in seen)
    assert all("policy/clipfrac" in h and "objective/kl" in h for h in history)
    scores = [h["objective/scores"] for h in history]
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 0.02, scores
    assert max(h["objective/kl"] for h in history) < 10


def test_phase5_early_stop_over_the_approx_kl_target(ppo_run, tiny_model_dir, tmp_path,
                                                    monkeypatch):
    calls = []
    original = PPO.compute_loss
    monkeypatch.setattr(PPO, "compute_loss",
                        lambda self, model, batch: calls.append(1) or original(self, model, batch))
    result = run_ppo(ppo_config(tmp_path, tiny_model_dir, ppo_run["prompts"],
                                target_approx_kl=1e-9), scorer=letter_e)
    # Epoch 0's update starts at ratio 1 (approx KL 0); epoch 1's exceeds the target: stop.
    assert result.history[-1]["policy/early_stop_epoch"] == 1
    assert len(calls) == 2  # 2 of the 4 epochs' updates ran


# -- Phase 6: evaluation ---------------------------------------------------------------

def test_phase6_markdown_report_compares_base_dpo_and_ppo(runs, ppo_run, tiny_model_dir):
    from prefalign.evaluation import evaluate
    from prefalign.generation import SamplingConfig

    root = runs["root"]
    models = {"base": tiny_model_dir, "dpo": root / "dpo" / "final", "ppo": root / "ppo" / "final"}
    prompts = ["The film 1:", "This book 2:", "Our trip 3:"]
    result = evaluate(models, prompts, root / "report", reward_model=root / "rm" / "final",
                      sampling=SamplingConfig(max_new_tokens=6, seed=1, batch_size=4),
                      progress=False)
    assert set(result.metrics) == {"base", "dpo", "ppo"}
    for row in result.metrics.values():
        assert math.isfinite(row["reward/mean"]) and 0 <= row["distinct_2"] <= 1
    md = result.paths["md"].read_text("utf-8")
    for text in ("base", "dpo", "ppo", "reward", "distinct"):
        assert text in md, text
    assert "The film 1:" in md  # side-by-side examples
