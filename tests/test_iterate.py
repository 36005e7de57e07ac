"""Iterative DPO: two real rounds on a tiny model with a rule-based scorer, resume, config."""

import json
import math

import pytest
import torch
import yaml

from helpers import write_jsonl
from prefalign import cli
from prefalign.algorithms.iterate import IterateConfig, round_prompts
from prefalign.errors import ConfigError
from prefalign.models import load_causal_lm
from prefalign.train.metrics import read_metrics

ITERATE = ("prefalign.algorithms.iterate", "IterateConfig", "run_iterate",
           "iterative DPO: rounds of sampling from the policy, scoring and DPO")
FIELDS = {"stage", "round", "policy", "samples", "mean_score", "score_std", "kl_to_start",
          "pairs", "score_gain"}
DPO_FIELDS = {"dpo_output", "dpo_loss_first", "dpo_loss_last", "dpo_accuracy_last"}


def records(out):
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_two_rounds_each_start_from_and_refer_to_the_previous_model(tmp_path, tiny_model_dir,
                                                                    monkeypatch, capsys):
    monkeypatch.setitem(cli.TRAINERS, "iterate", ITERATE)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"The film {i}:"} for i in range(4)])
    dpo_yaml = tmp_path / "dpo.yaml"  # a DPO config file is an iterate config as it is
    dpo_yaml.write_text(yaml.safe_dump({"beta": 0.1, "batch_size": 2, "grad_accum": 1,
                                        "max_steps": 2, "learning_rate": 0.02, "lora_r": 4,
                                        "lora_dropout": 0.0, "logging_steps": 1,
                                        "warmup_ratio": 0.0}))
    out = tmp_path / "iter"
    argv = ["iterate", "--config", str(dpo_yaml), "--model", str(tiny_model_dir), "--data",
            prompts, "--output-dir", str(out), "--scorer", "length(max=1,falloff=1000)",
            "--rounds", "2", "--num-candidates", "4", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "round 1/2: mean score" in printed and "round 2/2" in printed and "final:" in printed

    first, second, final = records(out)
    assert FIELDS | DPO_FIELDS <= set(first) and FIELDS | DPO_FIELDS <= set(second)
    assert FIELDS <= set(final) and final["stage"] == "final"
    assert (first["round"], second["round"]) == (1, 2) and first["score_gain"] is None
    assert second["score_gain"] == pytest.approx(second["mean_score"] - first["mean_score"])
    assert first["samples"] == second["samples"] == 16 and first["pairs"] > 0
    assert first["kl_to_start"] == 0.0  # round 1 samples the start model itself
    assert second["kl_to_start"] != 0.0 and final["kl_to_start"] != 0.0

    round1_final = out / "round-1" / "dpo" / "final"
    for r in (1, 2):
        assert (out / f"round-{r}" / "pairs.jsonl").is_file()
        assert (out / f"round-{r}" / "pairs.candidates.jsonl").is_file()
        assert (out / f"round-{r}" / "dpo" / "final" / "adapter_config.json").is_file()
    # Round 2 trains the model round 1 made, and that model is also its reference: with the
    # fresh adapters at zero the first step's policy equals the reference, so the loss is
    # -log sigmoid(0) = log 2 exactly.
    round2_config = yaml.safe_load((out / "round-2" / "dpo" / "config.yaml").read_text())
    assert round2_config["model"] == str(round1_final) and round2_config["ref_model"] is None
    assert second["policy"] == str(round1_final.resolve())
    for r in (1, 2):
        loss = read_metrics(out / f"round-{r}" / "dpo" / "metrics.jsonl")[0]["loss"]
        assert loss == pytest.approx(math.log(2), abs=1e-6)
    base = load_causal_lm(str(tiny_model_dir)).state_dict()
    trained = load_causal_lm(str(round1_final)).state_dict()
    assert any(not torch.equal(base[k], trained[k]) for k in base)

    # A rerun with --resume finds every round done; a lost last record is computed again,
    # and only it. Without --resume (or --overwrite) the used folder is refused.
    assert cli.main(argv) == 2
    lines = (out / "rounds.jsonl").read_text().splitlines()
    (out / "rounds.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    mtime = (out / "round-2" / "dpo" / "metrics.jsonl").stat().st_mtime
    assert cli.main([*argv, "--resume"]) == 0
    again = records(out)
    assert [r["stage"] for r in again] == ["round", "round", "final"]
    assert again[2]["mean_score"] == final["mean_score"]
    assert (out / "round-2" / "dpo" / "metrics.jsonl").stat().st_mtime == mtime


def test_prompts_per_round_take_turns():
    config = IterateConfig(model="m", data="d", scorer="s", prompts_per_round=3)
    prompts = [{"prompt": str(i)} for i in range(5)]
    assert [p["prompt"] for p in round_prompts(prompts, config, 1)] == ["0", "1", "2"]
    assert [p["prompt"] for p in round_prompts(prompts, config, 2)] == ["3", "4", "0"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"scorer": ""}, "'scorer' is required"),
    ({"loss_type": "simpo"}, "simpo has no reference"),
    ({"num_candidates": 1}, "'num_candidates' must be >= 2"),
])
def test_config_errors_name_the_key(overrides, message):
    config = IterateConfig(**{"model": "m", "data": "d", "scorer": "s", **overrides})
    with pytest.raises(ConfigError, match=message):
        config.validate()
