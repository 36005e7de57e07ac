"""Reward model: last-token reading, HF round trip, Bradley-Terry training, ECE, scoring."""

import copy
import dataclasses
import json
import math
import tempfile
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from helpers import preference_rows, write_jsonl
from prefalign.algorithms.reward import BradleyTerry, RewardConfig, run_reward
from prefalign.data import collate_preferences, load_preferences
from prefalign.data.collate import pad_sequences
from prefalign.errors import ConfigError
from prefalign.evaluation.calibration import expected_calibration_error
from prefalign.lora import apply_lora, lora_layers, save_adapter, unload_lora
from prefalign.models import RewardModel, init_reward_model, load_reward_model
from prefalign.models import reward_token_index as last_token_index
from prefalign.scoring.reward_model import RewardScorer, pair_sequences
from prefalign.scoring.score_file import score_file
from prefalign.tiny import build_model, build_tokenizer
from prefalign.train.metrics import read_metrics


def rewards_of(model, sequences, pad, side):
    ids, mask = pad_sequences(sequences, pad, side, None)
    with torch.no_grad():
        return model(ids, mask)


def hf_scores(directory, sequences, pad):
    """AutoModelForSequenceClassification's scores of right-padded sequences."""
    hf = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1).eval()
    ids, mask = pad_sequences(sequences, pad, "right", None)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


# -- the model ---------------------------------------------------------------------------


def test_last_token_index_hand_examples():
    """pad = 0. Right padding [5 6 7 0] -> 2; left padding [0 0 5 6] -> 3; with pad == eos = 2,
    [5 6 2 2] (a trailing EOS, then padding) -> 1, HF's rightmost non-pad token."""
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert last_token_index(ids, mask, 0).tolist() == [2, 3]
    eos = torch.tensor([[5, 6, 2, 2]])
    assert last_token_index(eos, torch.tensor([[1, 1, 1, 0]]), 2).tolist() == [1]
    assert last_token_index(eos, torch.tensor([[1, 1, 1, 0]]), None).tolist() == [2]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_right_padding_and_unpadded_agree(make_model, tokenizer, arch):
    """Each sequence's reward in a right- or left-padded batch equals score(h_last) of the
    sequence run alone, computed here by hand from the backbone."""
    model = RewardModel.from_causal_lm(make_model(arch), tokenizer.pad_token_id).eval()
    texts = ["The film was great fun.", "Bad.", "A helpful answer is clear and kind, always."]
    sequences = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    alone = []
    with torch.no_grad():
        for seq in sequences:
            hidden = model.backbone(input_ids=torch.tensor([seq])).last_hidden_state
            alone.append(model.score(hidden[0, -1]).item())
    alone = torch.tensor(alone)
    pad = tokenizer.pad_token_id
    right = rewards_of(model, sequences, pad, "right")
    left = rewards_of(model, sequences, pad, "left")
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-4)
    assert right.std() > 1e-3  # different sequences get different rewards


def test_pad_equals_eos_agrees_with_hf(tmp_path):
    """pad == eos: HF reads the token before the trailing EOS; so do we, in both paddings."""
    tok = build_tokenizer()
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    model = RewardModel.from_causal_lm(build_model(tok, seed=3), tok.pad_token_id).eval()
    sequences = [tok(t)["input_ids"] + [eos] for t in ["Good great film.", "Dull.", "Numbers 1 2"]]
    with torch.no_grad():
        before_eos = torch.tensor([
            model.score(model.backbone(input_ids=torch.tensor([s])).last_hidden_state[0, -2]).item()
            for s in sequences])
    right = rewards_of(model, sequences, eos, "right")
    torch.testing.assert_close(right, before_eos, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rewards_of(model, sequences, eos, "left"), right, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path, tok)
    assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] == eos
    torch.testing.assert_close(hf_scores(tmp_path, sequences, eos), right, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_round_trip(make_model, tokenizer, tmp_path, arch):
    """Saved as *ForSequenceClassification: HF and load_reward_model give the same scores."""
    model = RewardModel.from_causal_lm(make_model(arch, seed=2), tokenizer.pad_token_id).eval()
    model.save_pretrained(tmp_path, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [f"{'Llama' if arch == 'llama' else 'GPT2'}ForSequenceClassification"]
    assert len(config["id2label"]) == 1 and config["pad_token_id"] == tokenizer.pad_token_id
    sequences = [tokenizer(t)["input_ids"] for t in ["The sea is wide.", "def add(a, b):", "Hi"]]
    ours = rewards_of(model, sequences, tokenizer.pad_token_id, "right")
    torch.testing.assert_close(hf_scores(tmp_path, sequences, tokenizer.pad_token_id), ours,
                               atol=1e-5, rtol=1e-4)
    reloaded = load_reward_model(tmp_path).eval()
    torch.testing.assert_close(rewards_of(reloaded, sequences, tokenizer.pad_token_id, "left"),
                               ours, atol=1e-5, rtol=1e-4)


def test_load_causal_lm_and_adapter_dirs(make_model, tokenizer, tmp_path):
    """Reward training from a causal LM dir starts from its backbone + a fresh head (HF's
    init: std = initializer_range); from an SFT adapter dir, the merged fine-tuned backbone."""
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    plain = init_reward_model(tmp_path / "base")
    for (name, p), q in zip(plain.backbone.named_parameters(), base.model.parameters()):
        assert torch.equal(p, q), name
    std = plain.score.weight.std().item()
    assert 0.01 < std < 0.04 and base.config.initializer_range == 0.02
    assert plain.score.weight.requires_grad

    tuned = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(tuned).values():
            layer.lora_B.weight.normal_(0, 0.1)
    save_adapter(tuned, tmp_path / "sft", base_model_name_or_path=str(tmp_path / "base"))
    tokenizer.save_pretrained(tmp_path / "sft")
    merged = unload_lora(tuned, merge=True).eval()
    from_adapter = init_reward_model(tmp_path / "sft").eval()
    ids = torch.tensor([tokenizer("Good great excellent")["input_ids"]])
    with torch.no_grad():
        want = merged.model(input_ids=ids).last_hidden_state
        got = from_adapter.backbone(input_ids=ids).last_hidden_state
        plain_hidden = plain.backbone(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain_hidden, atol=1e-3)  # the adapter changed something


# -- the loss ----------------------------------------------------------------------------


class TableModel(nn.Module):
    """Rewards looked up by each row's last real token: a fixed, known batch of rewards."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        last = attention_mask.sum(-1) - 1
        values = [self.table[int(row[i])] for row, i in zip(input_ids, last)]
        return torch.tensor(values) + self.offset


def test_bradley_terry_hand_computed_with_margin_and_centering():
    """r_c = (2.0, 1.0), r_r = (1.0, 1.5); margin 0.5 on pair 1, none (= 0) on pair 2; centring 0.01.
    pair 1: -log sigmoid(2 - 1 - 0.5) = log(1 + e^-0.5) = 0.474077
    pair 2: -log sigmoid(1 - 1.5)     = log(1 + e^0.5)  = 0.974077      mean 0.724077
    centring: 0.01 * mean((2 + 1)^2, (1 + 1.5)^2) = 0.01 * (9 + 6.25) / 2 = 0.07625
    loss = 0.800327; accuracy 1/2; rewards/chosen 1.5, rewards/rejected 1.25; margin 0.25."""
    features = [
        {"prompt_input_ids": [10], "chosen_input_ids": [11], "rejected_input_ids": [12, 13],
         "margin": 0.5},
        {"prompt_input_ids": [20, 21], "chosen_input_ids": [22], "rejected_input_ids": [23]},
    ]
    model = TableModel({11: 2.0, 13: 1.0, 22: 1.0, 23: 1.5})
    algorithm = BradleyTerry(pad_token_id=0, center_coef=0.01)
    loss, metrics = algorithm.compute_loss(model, algorithm.collate(features))
    assert loss.item() == pytest.approx(0.800327, abs=1e-6)
    assert metrics["accuracy"].item() == 0.5
    assert metrics["rewards/chosen"].item() == pytest.approx(1.5)
    assert metrics["rewards/rejected"].item() == pytest.approx(1.25)
    assert metrics["margin"].item() == pytest.approx(0.25)
    # d loss / d offset: the offset cancels in r_c - r_r; the centring term gives
    # 0.01 * mean(2 (r_c + r_r) * 2) = 0.01 * (12 + 10) / 2 = 0.11.
    loss.backward()
    assert model.offset.grad.item() == pytest.approx(0.11, abs=1e-6)
    no_center, _ = BradleyTerry(0).compute_loss(model, algorithm.collate(features))
    assert no_center.item() == pytest.approx(0.724077, abs=1e-6)


def test_row_weight_counts_like_repetition():
    """r_c = (2.0, 1.0), r_r = (1.0, 1.5), no margin, weights (3, 1):
    loss = (3 * log(1 + e^-1) + log(1 + e^0.5)) / 4 = (3 * 0.313262 + 0.974077) / 4 = 0.478465,
    the loss with pair 1 given three times; units() = 4 pairs."""
    pairs = [{"prompt_input_ids": [10], "chosen_input_ids": [11], "rejected_input_ids": [13]},
             {"prompt_input_ids": [20], "chosen_input_ids": [22], "rejected_input_ids": [23]}]
    model = TableModel({11: 2.0, 13: 1.0, 22: 1.0, 23: 1.5})
    algorithm = BradleyTerry(pad_token_id=0)
    weighted = [dict(pairs[0], weight=3.0), dict(pairs[1], weight=1.0)]
    repeated = [pairs[0], pairs[0], pairs[0], pairs[1]]
    loss_w, _ = algorithm.compute_loss(model, algorithm.collate(weighted))
    loss_r, _ = algorithm.compute_loss(model, algorithm.collate(repeated))
    assert loss_w.item() == pytest.approx(0.478465, abs=1e-6)
    assert loss_r.item() == pytest.approx(loss_w.item(), abs=1e-7)
    assert algorithm.units(weighted) == algorithm.units(repeated) == 4.0


def test_expected_calibration_error_hand_computed():
    """p = sigmoid(r_c - r_r), confidence max(p, 1 - p), bins of width 0.05 over [0.5, 1].
    p = 0.92 (right) and p = 0.08 (wrong): confidence 0.92, bin [0.90, 0.95): |1 - 1.84| = 0.84
    p = 0.62 (right): bin [0.60, 0.65): |1 - 0.62| = 0.38
    p = 0.71 (right): bin [0.70, 0.75): |1 - 0.71| = 0.29
    ECE = (0.84 + 0.38 + 0.29) / 4 = 0.3775."""
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    diffs = torch.tensor([logit(0.92), logit(0.08), logit(0.62), logit(0.71)], dtype=torch.float64)
    zeros = torch.zeros(4, dtype=torch.float64)
    assert expected_calibration_error(diffs, zeros) == pytest.approx(0.3775, abs=1e-9)
    assert expected_calibration_error(zeros, -diffs) == pytest.approx(0.3775, abs=1e-9)
    # 4 pairs at p = 0.77, 3 right: confidence 0.77 in [0.75, 0.80), accuracy 0.75 -> 0.02.
    right, wrong = logit(0.77), logit(0.23)
    assert expected_calibration_error(torch.tensor([right, right, right, wrong], dtype=torch.float64),
                                      torch.zeros(4, dtype=torch.float64)) == pytest.approx(0.02, abs=1e-9)
    # p = 0.61 (right) and p = 0.34 (wrong, confidence 0.66) sit in neighbouring bins
    # [0.60, 0.65) and [0.65, 0.70): (0.39 + 0.66) / 2 = 0.525 (one 0.1-wide bin would give 0.135).
    pair = torch.tensor([logit(0.61), logit(0.34)], dtype=torch.float64)
    assert expected_calibration_error(pair, torch.zeros(2, dtype=torch.float64)) == pytest.approx(0.525)
    # Uneven split: batch {0.92, 0.08, 0.62} has ECE (2 * 0.42 + 0.38) / 3 = 0.406667 and
    # batch {0.71} has 0.29: their mean 0.348333 is not the whole set's 0.3775.
    first = expected_calibration_error(diffs[:3], zeros[:3])
    assert first == pytest.approx(1.22 / 3, abs=1e-9)
    assert (first + 0.29) / 2 != pytest.approx(0.3775, abs=1e-3)


def test_loss_equals_trl_reward_trainer(make_model, tokenizer):
    """TRL 1.16's RewardTrainer on the same model copy, rows (with margins) and centring."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = [dict(r, margin=0.3 * i) for i, r in enumerate(preference_rows(4, seed=5))]
    model = RewardModel.from_causal_lm(make_model("llama", seed=4), tokenizer.pad_token_id)
    theirs_model = copy.deepcopy(model).to_sequence_classification()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.RewardConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                                report_to="none", use_cpu=True, bf16=False, max_length=None,
                                center_rewards_coefficient=0.05, seed=0)
        trainer = trl.RewardTrainer(model=theirs_model, args=args, processing_class=tokenizer,
                                    train_dataset=datasets.Dataset.from_list(rows))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trl_loss = trainer.compute_loss(theirs_model.train(), batch)

    features, _ = load_preferences(rows, tokenizer)
    ours_batch = collate_preferences(features, tokenizer.pad_token_id)
    torch.testing.assert_close(ours_batch["input_ids"], batch["input_ids"])
    algorithm = BradleyTerry(tokenizer.pad_token_id, center_coef=0.05)
    loss, metrics = algorithm.compute_loss(model.train(), ours_batch)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert loss.item() != pytest.approx(math.log(2), abs=1e-2)  # margins make it non-trivial
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["accuracy"].item() == pytest.approx(trl_metrics["accuracy"])
    assert metrics["margin"].item() == pytest.approx(trl_metrics["margin"], abs=1e-6)


def test_config_validation():
    with pytest.raises(ConfigError, match="center_rewards_coefficient"):
        RewardConfig(model="m", data="d", center_rewards_coefficient=-1.0).validate()


# -- training end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One short LoRA run on a learnable task, with an eval split; shared by the tests below."""
    root = tmp_path_factory.mktemp("reward")
    train = write_jsonl(root / "train.jsonl", preference_rows(64))
    evals = write_jsonl(root / "eval.jsonl", preference_rows(32, seed=1))
    config = RewardConfig(model=str(tiny_model_dir), data=train, eval_data=evals,
                          output_dir=str(root / "out"), batch_size=8, grad_accum=1, max_steps=15,
                          learning_rate=5e-3, lora_r=8, lora_dropout=0.0, logging_steps=1,
                          eval_steps=5, warmup_ratio=0.0, lr_scheduler="constant", seed=7)
    result = run_reward(config)
    return root, config, result


def test_reward_model_learns(trained):
    """Loss starts near log 2 (the head starts small), eval accuracy climbs well above chance."""
    _, _, result = trained
    train = [h for h in result.history if "loss" in h]
    evals = [h for h in result.history if "eval/accuracy" in h]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert train[-1]["loss"] < 0.2
    assert [h["step"] for h in evals] == [5, 10, 15]
    assert evals[-1]["eval/accuracy"] > 0.85
    assert evals[-1]["eval/margin"] > evals[0]["eval/margin"] > 0


def test_metrics_and_ece_over_the_whole_eval_set(trained, tokenizer):
    root, config, _ = trained
    out = root / "out"
    records = read_metrics(out / "metrics.jsonl")
    for key in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "margin", "grad_norm"):
        assert key in records[0], key
    last = records[-1]
    assert last["step"] == 15 and last["eval/ece_pairs"] == 32
    model = load_reward_model(out / "final").eval()
    features, _ = load_preferences(config.eval_data, tokenizer)
    batch = collate_preferences(features, tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = model(batch["input_ids"], batch["attention_mask"])
    ece = expected_calibration_error(rewards[:32], rewards[32:])
    assert last["eval/ece"] == pytest.approx(ece, abs=1e-5)
    assert (out / "config.yaml").is_file() and (out / "final" / "tokenizer_config.json").is_file()


def test_final_artifact_loads_in_hf(trained, tokenizer):
    root, config, _ = trained
    final = root / "out" / "final"
    sequences = pair_sequences(load_preferences(config.eval_data, tokenizer)[0][:6])
    ours = rewards_of(load_reward_model(final).eval(), sequences, tokenizer.pad_token_id, "left")
    theirs = hf_scores(final, sequences, tokenizer.pad_token_id)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert (ours[:6] > ours[6:]).float().mean() > 0.8  # trained: chosen scores higher


def test_score_file_pairs_and_responses(trained, tokenizer, tmp_path):
    """score_chosen/score_rejected equal the model's training-batch rewards; a response row
    scores like the same text as a pair's chosen, in text, completion and chat forms."""
    root, config, _ = trained
    final = root / "out" / "final"
    rows = preference_rows(5, seed=9)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows + [dict(rows[0], rejected=rows[0]["chosen"])])
    written = score_file(final, pairs, batch_size=2)
    assert written == tmp_path / "pairs.scored.jsonl"
    scored = [json.loads(line) for line in written.read_text().splitlines()]
    assert scored[-1]["score_chosen"] is None  # chosen == rejected: dropped as in training

    model = load_reward_model(final).eval()
    features, _ = load_preferences(rows, tokenizer)
    batch = collate_preferences(features, tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = model(batch["input_ids"], batch["attention_mask"]).tolist()
    for i, row in enumerate(scored[:5]):
        assert row["prompt"] == rows[i]["prompt"]
        assert row["score_chosen"] == pytest.approx(rewards[i], abs=1e-5)
        assert row["score_rejected"] == pytest.approx(rewards[5 + i], abs=1e-5)

    singles = [{"prompt": rows[0]["prompt"], "response": rows[0]["chosen"]},
               {"prompt": rows[1]["prompt"], "completion": rows[1]["rejected"]},
               {"messages": [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello there."}]}]
    out = score_file(final, write_jsonl(tmp_path / "s.jsonl", singles), tmp_path / "o.jsonl")
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    assert scores[0] == pytest.approx(rewards[0], abs=1e-5)
    assert scores[1] == pytest.approx(rewards[6], abs=1e-5)
    scorer = RewardScorer(model, tokenizer, batch_size=3)
    chat = scorer.score([[{"role": "user", "content": "Hi"}]], ["Hello there."])
    assert scores[2] == pytest.approx(chat[0], abs=1e-5)
    assert scorer.score([rows[0]["prompt"]], [rows[0]["chosen"]]) == pytest.approx([rewards[0]], abs=1e-5)


def test_full_finetune_writes_sequence_classification(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(8))
    run_reward(RewardConfig(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / "o"),
                            batch_size=4, grad_accum=1, max_steps=1, learning_rate=1e-3, lora_r=0,
                            warmup_ratio=0.0))
    final = tmp_path / "o" / "final"
    trained = AutoModelForSequenceClassification.from_pretrained(final, num_labels=1)
    base = init_reward_model(tiny_model_dir).backbone
    changed = [n for (n, p), q in zip(trained.model.named_parameters(), base.parameters())
               if not torch.equal(p, q)]
    assert len(changed) == len(list(base.parameters()))  # every backbone weight trained


def test_resume_equals_uninterrupted_and_checkpoints_hold_the_head(tmp_path, tiny_model_dir):
    """A LoRA run trains the adapters and the whole head: both are in the checkpoint, and a
    run resumed from step 2 ends with the same artifact as an uninterrupted one."""
    import shutil

    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(16))

    def cfg(name, **kw):
        return RewardConfig(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / name),
                            batch_size=4, grad_accum=1, max_steps=4, learning_rate=1e-2, lora_r=4,
                            lora_dropout=0.0, warmup_ratio=0.0, seed=3, **kw)

    run_reward(cfg("full"))
    part = cfg("part", save_steps=2)
    run_reward(part)
    checkpoints = sorted((tmp_path / "part" / "checkpoints").iterdir())
    keys = set(load_file(str(checkpoints[0] / "trainable.safetensors")))
    assert "score.weight" in keys
    assert all(k == "score.weight" or ".lora_A." in k or ".lora_B." in k for k in keys)
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(tmp_path / "part" / "final")
    run_reward(dataclasses.replace(part, resume=True))  # configs are frozen
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[q], base[q])  # LoRA merged into the attention projections
    assert torch.equal(a[up], base[up])  # and nothing else in the backbone


def test_cli_reward_then_score(tmp_path, tiny_model_dir):
    import json

    from prefalign.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(8))
    out = tmp_path / "rm"
    assert main(["reward", "--model", str(tiny_model_dir), "--data", data, "--eval-data", data,
                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--grad-accum", "1", "--lora-r", "4", "--logging-steps", "1",
                 "--center-rewards-coefficient", "0.01"]) == 0
    assert (out / "final" / "config.json").is_file() and (out / "config.yaml").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval/ece" in records[-1] and "accuracy" in records[0]
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--reward-model", str(out / "final"), "--data", data,
                 "--output", str(scored), "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(r["score_chosen"], float) for r in rows)
    assert main(["score", "--reward-model", str(tmp_path / "missing"), "--data", data]) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_mlp_only_at_read_positions_gives_the_same_rewards_and_gradients(
        make_model, tokenizer, arch, checkpointing):
    """The last layer's MLP runs on one position per sequence (the reward token), and the
    rewards and every gradient equal running it everywhere; gradient checkpointing, which
    recomputes the layer in backward, keeps the full MLP."""
    import copy

    ids = tokenizer(["a b c d e f", "a b", "c d e"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    base = RewardModel.from_causal_lm(make_model(arch), tokenizer.pad_token_id)
    torch.nn.init.normal_(base.score.weight, std=0.5)
    for module in base.modules():  # train mode (checkpointing needs it), same numbers
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    results = []
    for at_reads in (False, True):
        model = copy.deepcopy(base).train()
        model.last_mlp_at_reads = at_reads
        if checkpointing:
            model.backbone.gradient_checkpointing_enable({"use_reentrant": False})
        rows = []
        layers = getattr(model.backbone, "layers", None) or model.backbone.h
        layers[-1].mlp.register_forward_hook(
            lambda m, a, o, rows=rows: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
        rewards = model(ids["input_ids"], ids["attention_mask"])
        (rewards * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((rewards.detach(), grads, rows[0]))
    (r_full, g_full, rows_full), (r_read, g_read, rows_read) = results
    positions = ids["input_ids"].numel()
    assert rows_full == positions and rows_read == (positions if checkpointing else 3)
    torch.testing.assert_close(r_read, r_full, atol=1e-5, rtol=0)
    assert g_read.keys() == g_full.keys() and len(g_full) > 4
    for name in g_full:
        torch.testing.assert_close(g_read[name], g_full[name], atol=1e-5, rtol=1e-4, msg=name)
