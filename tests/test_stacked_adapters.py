"""Stacked LoRA stages (SFT -> DPO -> KTO -> PPO) write a final/ that PEFT loads alone.

A stage started from an adapter directory trains on the merged model; its final/ must be
one adapter over the true base whose update is the sum of every stage's, so that
`PeftModel.from_pretrained(base, final)` equals prefalign's own `load_causal_lm(final)`.
"""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import letter_e, preference_rows, write_jsonl
from prefalign.algorithms.dpo import DPOConfig, run_dpo
from prefalign.algorithms.kto import KTOConfig, run_kto
from prefalign.algorithms.ppo import PPOConfig, run_ppo
from prefalign.algorithms.sft import SFTConfig, run_sft
from prefalign.lora import apply_lora, lora_layers
from prefalign.lora.stack import stack_factors
from prefalign.models import load_causal_lm, save_policy

peft = pytest.importorskip("peft")

IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 29, 2], [7, 7, 19, 23, 31, 4, 6, 9]])


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def randomize_b(model, seed):
    """B starts at zero; a trained adapter has B != 0, so give it random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)


def save_sft_adapter(tmp_path, make_model, tokenizer):
    """A llama base in tmp_path/base and a LoRA "SFT" stage over it in tmp_path/sft
    (q_proj, v_proj, r=4, random B); returns the base's directory."""
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    first = load_causal_lm(str(base_dir))
    apply_lora(first, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_b(first, 0)
    save_policy(first, tokenizer, tmp_path / "sft", base_name=str(base_dir))
    return base_dir


def assert_peft_equals(final, base_dir, expected):
    """PeftModel on the true base and AutoPeftModelForCausalLM both give `expected`."""
    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(plain, final)), expected,
                               atol=1e-5, rtol=0)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(final)
    torch.testing.assert_close(logits(auto), expected, atol=1e-5, rtol=0)


def test_stack_factors_concatenates_ranks_and_zero_pads():
    """Stage 1 (r=2) adapts m and n, stage 2 (r=1) adapts m only:
    A'_m = [A1; A2] (3, in), B'_m = [B1, B2] (out, 3); n gets zero row/column for stage 2,
    so B'_n A'_n = B1_n A1_n."""
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(2, 4, generator=g), torch.randn(5, 2, generator=g)
    n1, c1 = torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g)
    a2, b2 = torch.randn(1, 4, generator=g), torch.randn(5, 1, generator=g)
    r, stacked = stack_factors([{"m": (a1, b1), "n": (n1, c1)}, {"m": (a2, b2)}])
    assert r == 3
    torch.testing.assert_close(stacked["m"][1] @ stacked["m"][0], b1 @ a1 + b2 @ a2)
    torch.testing.assert_close(stacked["n"][1] @ stacked["n"][0], c1 @ n1)
    assert stacked["n"][0].shape == (3, 4) and not stacked["n"][0][2:].any()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_three_stages_with_different_ranks_targets_and_scaling(tmp_path, make_model, tokenizer,
                                                               arch):
    """Each stage: load the previous final/ (merged), add LoRA with its own rank, alpha and
    targets, save. The last final/ loads in PEFT (and here) as the in-memory model."""
    base_dir = tmp_path / "base"
    make_model(arch).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    targets = {"llama": [["q_proj", "v_proj"], ["o_proj", "q_proj"], "all-linear"],
               "gpt2": [["c_attn"], ["attn.c_proj"], ["c_attn", "mlp.c_fc"]]}[arch]
    shapes = [dict(r=4, alpha=8), dict(r=2, alpha=16, use_rslora=True), dict(r=3, alpha=3)]
    path, ranks = base_dir, 0
    for stage, (target, shape) in enumerate(zip(targets, shapes)):
        model = load_causal_lm(str(path))
        apply_lora(model, target, **shape)
        randomize_b(model, seed=stage)
        expected = logits(model)
        path = tmp_path / f"stage-{stage}"
        save_policy(model, tokenizer, path, base_name=str(tmp_path / "never-used" if stage
                                                          else base_dir))
        ranks += shape["r"]
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base_dir)
        if stage:
            assert config["r"] == ranks and config["lora_alpha"] == ranks
        torch.testing.assert_close(logits(load_causal_lm(str(path))), expected, atol=1e-5, rtol=0)
        assert_peft_equals(path, base_dir, expected)
    assert ranks == 9 and config["r"] == 9


def test_adapter_naming_an_adapter_base_still_loads_as_every_stage(tmp_path, make_model,
                                                                   tokenizer):
    """An artifact written before stacking (base = another adapter dir) loads as both
    stages here, and a stage trained on it saves one adapter over the true base."""
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = load_causal_lm(str(base_dir))
    apply_lora(model, ["q_proj"], r=2, alpha=4)
    randomize_b(model, 1)
    save_policy(model, tokenizer, tmp_path / "a", base_name=str(base_dir))
    model = load_causal_lm(str(tmp_path / "a"))
    del model.merged_adapters  # as the old loader left it: base recorded as adapter dir "a"
    apply_lora(model, ["v_proj"], r=2, alpha=4)
    randomize_b(model, 2)
    save_policy(model, tokenizer, tmp_path / "b", base_name=str(tmp_path / "a"))
    chained = load_causal_lm(str(tmp_path / "b"))
    apply_lora(chained, ["k_proj"], r=1, alpha=1)
    randomize_b(chained, 3)
    expected = logits(chained)
    save_policy(chained, tokenizer, tmp_path / "c", base_name="unused")
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["r"] == 5
    assert_peft_equals(tmp_path / "c", base_dir, expected)



def test_sft_dpo_kto_ppo_chain_loads_in_peft(tmp_path, tiny_model_dir):
    """The trainers themselves, a few steps each, ranks 4, 2, 3, 2 on different targets:
    every final/ names the true base, and PEFT's model equals prefalign's."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(16)]
    thumbs = [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"],
               "label": bool(i % 2)} for i, r in enumerate(preference_rows(16))]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review {i}: The film"}
                                                        for i in range(8)])
    common = dict(batch_size=4, grad_accum=1, max_steps=2, learning_rate=1e-2, logging_steps=1,
                  warmup_ratio=0.0, seed=7, lr_scheduler="constant", lora_dropout=0.0)
    out = {name: str(tmp_path / name) for name in ("sft", "dpo", "kto", "ppo")}
    run_sft(SFTConfig(model=str(tiny_model_dir), data=write_jsonl(tmp_path / "s.jsonl", sft_rows),
                      output_dir=out["sft"], lora_r=4, lora_targets=["q_proj", "v_proj"],
                      **common))
    run_dpo(DPOConfig(model=out["sft"] + "/final", data=pairs, output_dir=out["dpo"], lora_r=2,
                      lora_targets=["o_proj", "q_proj"], **common))
    run_kto(KTOConfig(model=out["dpo"] + "/final", data=write_jsonl(tmp_path / "k.jsonl", thumbs),
                      output_dir=out["kto"], lora_r=3, lora_targets=["down_proj"], **common))
    run_ppo(PPOConfig(model=out["kto"] + "/final", data=prompts, output_dir=out["ppo"], lora_r=2,
                      lora_targets=["k_proj"], max_new_tokens=4, ppo_epochs=1, temperature=1.0,
                      **common), scorer=letter_e)
    ranks = {"sft": 4, "dpo": 6, "kto": 9, "ppo": 11}
    for name, folder in out.items():
        final = f"{folder}/final"
        assert_peft_equals(final, tiny_model_dir, logits(load_causal_lm(final)))
        config = json.loads(open(f"{final}/adapter_config.json").read())
        assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve()), name
        assert config["r"] == ranks[name], name
    # The last stage changed the model: PEFT's base + PPO alone would differ from it.
    ppo = logits(load_causal_lm(out["ppo"] + "/final"))
    assert not torch.allclose(ppo, logits(load_causal_lm(out["kto"] + "/final")), atol=1e-4)


def test_resume_of_a_stacked_stage_writes_the_same_combined_adapter(tmp_path, make_model,
                                                                    tokenizer):
    """Checkpoints hold the stage's own adapter (rank 2); a run resumed from one writes the
    same combined final/ (rank 4 + 2) as the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    base_dir = save_sft_adapter(tmp_path, make_model, tokenizer)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))

    def dpo(name, **kw):
        return DPOConfig(model=str(tmp_path / "sft"), data=pairs, output_dir=str(tmp_path / name),
                         lora_r=2, lora_targets=["o_proj"], batch_size=4, grad_accum=1,
                         max_steps=4, learning_rate=1e-2, warmup_ratio=0.0, seed=3,
                         lr_scheduler="constant", **kw)

    run_dpo(dpo("full"))
    part = dpo("part", save_steps=2)
    run_dpo(part)
    ckpts = sorted((tmp_path / "part" / "checkpoints").iterdir())
    stage = load_file(str(ckpts[0] / "trainable.safetensors"))
    assert stage and all(t.shape[0] == 2 or t.shape[1] == 2 for t in stage.values())
    assert all("o_proj" in k for k in stage)
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(tmp_path / "part" / "final")
    part = dataclasses.replace(part, resume=True)
    run_dpo(part)
    full = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "part" / "final" / "adapter_model.safetensors"))
    assert full.keys() == resumed.keys() and len(full) == 2 * 2 * 3  # q, v, o in 2 layers
    for key in full:
        torch.testing.assert_close(full[key], resumed[key], atol=0, rtol=0, msg=key)
    config = json.loads((tmp_path / "part" / "final" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["base_model_name_or_path"] == str(base_dir)


def test_reward_from_an_adapter_writes_a_whole_classification_model(tmp_path, make_model,
                                                                    tokenizer):
    """Reward's final/ is a merged sequence-classification directory: transformers loads it
    alone, and its backbone holds the starting adapter's update (it is not the base's)."""
    from transformers import AutoModelForSequenceClassification

    from prefalign.algorithms.reward import RewardConfig, run_reward
    from prefalign.models import load_reward_model

    base_dir = save_sft_adapter(tmp_path, make_model, tokenizer)
    run_reward(RewardConfig(model=str(tmp_path / "sft"), data=write_jsonl(
        tmp_path / "p.jsonl", preference_rows(8)), output_dir=str(tmp_path / "rm"), batch_size=4,
        grad_accum=1, max_steps=1, learning_rate=1e-3, lora_r=2, lora_targets=["o_proj"],
        warmup_ratio=0.0))
    final = tmp_path / "rm" / "final"
    assert not (final / "adapter_config.json").exists()
    hf = AutoModelForSequenceClassification.from_pretrained(final, num_labels=1).eval()
    ours = load_reward_model(final).eval()
    with torch.no_grad():
        theirs_scores = hf(input_ids=IDS).logits.squeeze(-1)
        ours_scores = ours(IDS, torch.ones_like(IDS))
    torch.testing.assert_close(ours_scores, theirs_scores, atol=1e-5, rtol=0)
    v = "model.layers.0.self_attn.v_proj.weight"  # adapted by the first stage only
    merged = load_causal_lm(str(tmp_path / "sft")).state_dict()[v]
    torch.testing.assert_close(hf.state_dict()[v], merged, atol=0, rtol=0)
    assert not torch.allclose(merged, AutoModelForCausalLM.from_pretrained(base_dir).state_dict()[v])
