"""DPO through the one training loop: invariances, resume, learning, CLI artifacts."""

import dataclasses
import json

import pytest
import torch

from helpers import preference_rows, write_jsonl
from prefalign.algorithms.dpo import DPOConfig, run_dpo
from prefalign.cli import main
from prefalign.lora import ADAPTER_CONFIG
from prefalign.train.metrics import read_metrics


def config(tmp_path, model_dir, data, **overrides):
    base = dict(model=str(model_dir), data=data, output_dir=str(tmp_path / "out"), batch_size=2,
                grad_accum=2, max_steps=3, learning_rate=1e-3, lora_r=4, lora_dropout=0.0,
                logging_steps=1, warmup_ratio=0.0, seed=7)
    base.update(overrides)
    return DPOConfig(**base)


def final_adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "adapter_model.safetensors"))


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))


def test_accumulation_1x8_equals_8x1(tmp_path, tiny_model_dir, data):
    """One step over the same 8 examples: 8 micro-batches of 1 == 1 micro-batch of 8."""
    one = run_dpo(config(tmp_path / "a", tiny_model_dir, data, batch_size=8, grad_accum=1))
    many = run_dpo(config(tmp_path / "b", tiny_model_dir, data, batch_size=1, grad_accum=8))
    a, b = final_adapter(tmp_path / "a" / "out"), final_adapter(tmp_path / "b" / "out")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    for ra, rb in zip(one.history, many.history):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), key


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, data):
    # Dropout kept on, so the resumed run also needs the RNG state back.
    full = config(tmp_path / "full", tiny_model_dir, data, max_steps=6, lora_dropout=0.1,
                  disable_dropout=False)
    run_dpo(full)
    part = config(tmp_path / "part", tiny_model_dir, data, max_steps=6, save_steps=2,
                  lora_dropout=0.1, disable_dropout=False)
    # Interrupt after step 4 by running a copy limited to 4 steps but with the same schedule:
    # stop the loop early through a failing algorithm hook is not needed; instead run to 6
    # once, delete everything after checkpoint 4 and resume from it.
    run_dpo(part)
    out = tmp_path / "part" / "out"
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-0000004", "step-0000006"]  # save_total_limit 2
    import shutil

    shutil.rmtree(ckpts[-1])
    shutil.rmtree(out / "final")
    part = dataclasses.replace(part, resume=True)
    run_dpo(part)
    a, b = final_adapter(tmp_path / "full" / "out"), final_adapter(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    full_metrics = read_metrics(tmp_path / "full" / "out" / "metrics.jsonl")
    resumed_metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in resumed_metrics] == [1, 2, 3, 4, 5, 6]
    for m1, m2 in zip(full_metrics, resumed_metrics):
        for key in ("loss", "rewards/margins", "lr", "epoch"):
            assert m1[key] == pytest.approx(m2[key], abs=1e-6), (m1["step"], key)


def test_dpo_learns_a_preference_task(tmp_path, tiny_model_dir):
    """Loss starts at log 2, falls; accuracy > 0.8; chosen ratio up, rejected down."""
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(64))
    result = run_dpo(config(tmp_path, tiny_model_dir, data, max_steps=30, batch_size=8,
                            grad_accum=1, learning_rate=5e-3, lora_r=8, beta=0.1,
                            lr_scheduler="constant"))
    first, last = result.history[0], result.history[-1]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    late = result.history[-5:]
    mean = lambda key: sum(r[key] for r in late) / len(late)  # noqa: E731
    assert mean("loss") < 0.55 < first["loss"]
    assert mean("rewards/accuracies") > 0.8
    assert mean("rewards/chosen") > 0 > mean("rewards/rejected")
    assert last["step"] == 30


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "simpo", "orpo", "robust", "apo_zero"])
def test_every_loss_trains_a_step(tmp_path, tiny_model_dir, data, loss_type):
    extra = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    result = run_dpo(config(tmp_path, tiny_model_dir, data, max_steps=1, loss_type=loss_type,
                            **extra))
    record = result.history[-1]
    assert torch.isfinite(torch.tensor(record["loss"]))
    assert ("nll_loss" in record) == (loss_type == "orpo")


def test_precomputed_reference_equals_live_reference(tmp_path, tiny_model_dir, data):
    live = run_dpo(config(tmp_path / "live", tiny_model_dir, data, lora_r=0, learning_rate=1e-4))
    cached = run_dpo(config(tmp_path / "pre", tiny_model_dir, data, lora_r=0,
                            learning_rate=1e-4, precompute_ref=True))
    assert list((tmp_path / "pre" / "out" / "cache").glob("ref_logps-*.safetensors"))
    for a, b in zip(live.history, cached.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_row_weight_equals_repetition(tmp_path, tiny_model_dir):
    """A pair with weight 2 counts exactly like the pair given twice."""
    rows = preference_rows(3)
    weighted = [dict(rows[0], weight=2.0), rows[1], rows[2]]
    repeated = [rows[0], rows[0], rows[1], rows[2]]
    a = run_dpo(config(tmp_path / "w", tiny_model_dir, write_jsonl(tmp_path / "w.jsonl", weighted),
                       batch_size=4, grad_accum=1, max_steps=1))
    b = run_dpo(config(tmp_path / "r", tiny_model_dir, write_jsonl(tmp_path / "r.jsonl", repeated),
                       batch_size=4, grad_accum=1, max_steps=1))
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], abs=1e-6)
    wa, wb = final_adapter(tmp_path / "w" / "out"), final_adapter(tmp_path / "r" / "out")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-5)


def test_beta_per_source(tmp_path, tiny_model_dir):
    rows = [dict(r, source="safe" if i % 2 else "helpful") for i, r in enumerate(preference_rows(8))]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    result = run_dpo(config(tmp_path, tiny_model_dir, data, max_steps=2,
                            beta_per_source={"helpful": 0.1, "safe": 0.5}))
    assert torch.isfinite(torch.tensor(result.history[-1]["loss"]))


def test_cli_writes_artifacts(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "cli"
    code = main(["dpo", "--model", str(tiny_model_dir), "--data", data, "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4",
                 "--logging-steps", "1", "--merge"])
    assert code == 0
    assert (out / "final" / ADAPTER_CONFIG).is_file()
    assert (out / "final-merged" / "config.json").is_file()
    assert (out / "config.yaml").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "epoch", "lr", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen",
                "logits/rejected"):
        assert key in records[-1], key


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, data, capsys):
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", data, "--beta", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "beta" in err and "> 0" in err
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", data, "--loss-type", "nope"]) == 2
    err = capsys.readouterr().err
    assert "sigmoid" in err and "simpo" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 0.1\nlearning_rte: 1e-5\n")
    assert main(["dpo", "--config", str(bad), "--model", str(tiny_model_dir), "--data", data]) == 2
    assert "learning_rte" in capsys.readouterr().err


def test_full_finetune_writes_hf_model_and_checkpointing_is_exact(tmp_path, tiny_model_dir, data):
    from transformers import AutoModelForCausalLM

    plain = run_dpo(config(tmp_path / "a", tiny_model_dir, data, lora_r=0, max_steps=2,
                           learning_rate=1e-3))
    ckpt = run_dpo(config(tmp_path / "b", tiny_model_dir, data, lora_r=0, max_steps=2,
                          learning_rate=1e-3, gradient_checkpointing=True))
    for a, b in zip(plain.history, ckpt.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    final = tmp_path / "a" / "out" / "final"
    trained = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, p), q in zip(trained.named_parameters(), base.parameters())
               if not torch.equal(p, q)]
    assert len(changed) == len(list(base.parameters()))  # every weight trained
    assert (final / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("name", ["sft", "dpo", "kto", "reward"])
def test_shipped_configs_are_valid(name, tiny_model_dir, data):
    from pathlib import Path

    from prefalign.algorithms.kto import KTOConfig
    from prefalign.algorithms.reward import RewardConfig
    from prefalign.algorithms.sft import SFTConfig
    from prefalign.config import build_config, load_yaml

    values = load_yaml(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    cls = {"sft": SFTConfig, "dpo": DPOConfig, "kto": KTOConfig, "reward": RewardConfig}[name]
    build_config(cls, {**values, "model": str(tiny_model_dir), "data": data})
