"""Reward-model prefix sharing ([prompt | chosen | rejected] rows) gives the plain path's
rewards, Bradley-Terry loss, metrics and gradients."""

import copy
import random

import pytest
import torch

from helpers import preference_rows, write_jsonl
from prefalign.algorithms.reward import BradleyTerry, RewardConfig, run_reward
from prefalign.lora import apply_lora, lora_layers
from prefalign.models import RewardModel
from prefalign.packing import fallback_note


def pairs_with_padding_ids(pad, pad_is_eos, n=4, seed=1):
    """Prompts of 2-6 tokens, completions of 1-7, so rows pad unevenly; margins vary.
    pad_is_eos: some completions end in the pad id (a trailing EOS when pad == eos), which
    the reward skips as HF does; rejected [pad] alone is read at the prompt's last token."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randint(3, 499) for _ in range(k)]  # noqa: E731  (never 0..2)
    out = [{"prompt_input_ids": ids(rng.randint(2, 6)), "chosen_input_ids": ids(rng.randint(1, 7)),
            "rejected_input_ids": ids(rng.randint(1, 7)), "margin": 0.25 * i} for i in range(n)]
    if pad_is_eos:
        out[0]["chosen_input_ids"] += [pad]
        out[1]["rejected_input_ids"] += [pad, pad]
        out[2]["rejected_input_ids"] = [pad]
    return out


def backbone_rows(model):
    """Record the input_ids shape of every backbone call."""
    shapes = []
    model.backbone.register_forward_pre_hook(
        lambda _m, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes


def test_shared_positions_by_hand():
    """Pairs (prompt | chosen | rejected): [5, 6 | 7 | 8, 9] and [5 | 6, 7 | 9]; shared rows
    [5, 6, 7, 8, 9] and [5, 6, 7, 9, pad], width 5.
    pad 0: rewards read at 7 (pos 2), 7 (5 + 2), 9 (pos 4: the rejected 8, 9 sit after the
    chosen 7) and 9 (5 + 3).
    pad 9 (= eos): a trailing 9 is padding, so pair 1's rejected is read at its 8 (pos 3)
    and pair 2's rejected, nothing but a 9, at the prompt's 5 (5 + 0), as HF reads them."""
    features = [{"prompt_input_ids": [5, 6], "chosen_input_ids": [7], "rejected_input_ids": [8, 9]},
                {"prompt_input_ids": [5], "chosen_input_ids": [6, 7], "rejected_input_ids": [9]}]
    for pad, source, tokens in ((0, [2, 7, 4, 8], [7, 7, 9, 9]), (9, [2, 7, 3, 5], [7, 7, 8, 5])):
        batch = BradleyTerry(pad, prefix_sharing=True).collate(features)
        assert batch["packed_source"].tolist() == source
        assert batch["packed_input_ids"].flatten()[batch["packed_source"]].tolist() == tokens
        assert batch["packed_position_ids"][0].tolist() == [0, 1, 2, 2, 3]


@pytest.mark.parametrize("arch, impl, lora, pad_is_eos", [
    ("llama", "sdpa", True, False), ("llama", "eager", False, True),
    ("qwen2", "sdpa", False, True), ("qwen2", "eager", True, False)])
def test_prefix_sharing_equals_plain(make_model, arch, impl, lora, pad_is_eos):
    """Rewards, loss (with margins and centring), metrics and every gradient (LoRA adapters
    or the whole backbone, and the head) agree to 1e-5; the backbone reads B rows, not 2B."""
    pad = 2 if pad_is_eos else 0
    features = pairs_with_padding_ids(pad, pad_is_eos)
    torch.manual_seed(0)
    base = RewardModel.from_causal_lm(make_model(arch, attn_implementation=impl), pad)
    if lora:
        apply_lora(base.backbone, r=4, alpha=8)
        for layer in lora_layers(base.backbone).values():  # B != 0: the adapters count
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        base.score.requires_grad_(True)
    # Rewards of order 1 (the final norm gives unit-scale features): margins well away from 0.
    torch.nn.init.normal_(base.score.weight, std=base.score.in_features ** -0.5)
    results = []
    for sharing in (False, True):
        model = copy.deepcopy(base)
        algorithm = BradleyTerry(pad, center_coef=0.01, prefix_sharing=sharing)
        batch = algorithm.collate(features)
        shapes = backbone_rows(model)
        with torch.no_grad():
            rewards = model(batch["input_ids"], batch["attention_mask"], **batch.packed_kwargs())
        loss, metrics = algorithm.compute_loss(model.train(), batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((rewards, loss, metrics, grads, shapes))
    (r_a, loss_a, m_a, g_a, rows_a), (r_b, loss_b, m_b, g_b, rows_b) = results
    assert rows_a[0][0] == 8 and rows_b[0][0] == 4  # the shared path really ran
    torch.testing.assert_close(r_b, r_a, atol=1e-5, rtol=0)
    assert r_a.std() > 0.1 and m_a["accuracy"] not in (0.0, 1.0)
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-6)
    for key in m_a:
        assert float(m_b[key]) == pytest.approx(float(m_a[key]), abs=1e-5), key
    assert g_a.keys() == g_b.keys()
    assert any("lora_A" in n for n in g_a) == lora and "score.weight" in g_a
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], atol=1e-5, rtol=0, msg=name)


def test_unsupported_attention_falls_back(make_model):
    model = RewardModel.from_causal_lm(make_model("llama"), 0)
    assert fallback_note(model, "prefix_sharing") is None
    model.config._attn_implementation = "flash_attention_2"
    note = fallback_note(model, "prefix_sharing")
    assert note.startswith("warning: prefix_sharing is off")
    assert "flash_attention_2" in note and "\n" not in note


def test_prefix_sharing_run_equals_plain_run(tmp_path, tiny_model_dir, monkeypatch):
    """Three LoRA steps through the loop with an eval at step 3 (and the ECE record after
    it): every logged number agrees, and the shared run did read shared batches."""
    data = write_jsonl(tmp_path / "train.jsonl", preference_rows(8))
    evals = write_jsonl(tmp_path / "eval.jsonl", preference_rows(4, seed=1))
    shared_calls = []
    forward = RewardModel.forward

    def spy(self, input_ids, attention_mask, packed=None):
        shared_calls.append(packed is not None)
        return forward(self, input_ids, attention_mask, packed)

    monkeypatch.setattr(RewardModel, "forward", spy)
    runs = []
    for sharing in (False, True):
        runs.append(run_reward(RewardConfig(
            model=str(tiny_model_dir), data=data, eval_data=evals,
            output_dir=str(tmp_path / str(sharing)), batch_size=4, grad_accum=1, max_steps=3,
            learning_rate=1e-2, lora_r=4, lora_dropout=0.0, logging_steps=1, eval_steps=3,
            warmup_ratio=0.0, seed=7, prefix_sharing=sharing)))
    assert shared_calls.count(True) == 4  # 3 training batches + 1 eval batch
    plain, shared = (r.history for r in runs)
    losses = [h["loss"] for h in plain if "loss" in h]
    assert abs(losses[-1] - losses[0]) > 1e-3  # the model moved
    assert len(plain) == len(shared)
    for a, b in zip(plain, shared):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float) and key != "elapsed_s":  # elapsed_s: wall-clock
                assert b[key] == pytest.approx(value, abs=1e-5), (a["step"], key)
