"""Decisions made at run time go to OUTPUT/run.log; config.yaml keeps what the user asked for."""

import pytest
import yaml

from helpers import preference_rows, write_jsonl
from prefalign.algorithms.dpo import DPOConfig, run_dpo
from prefalign.algorithms.sft import SFTConfig, run_sft

COMMON = dict(batch_size=2, grad_accum=1, max_steps=1, learning_rate=1e-3, lora_r=4,
              lora_dropout=0.0, logging_steps=1, warmup_ratio=0.0, seed=7)


@pytest.fixture
def no_custom_masks(monkeypatch):
    """The tiny model takes custom 4D masks; pretend it does not, as flash attention would."""
    monkeypatch.setattr("prefalign.packing.custom_mask_problem",
                        lambda model: "attention implementation 'flash_attention_2' ignores "
                                      "custom 4D masks (needs sdpa or eager)")


def check_recorded(out, config, flag):
    assert getattr(config, flag) is True  # the config object is not rewritten either
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved[flag] is True
    log = (out / "run.log").read_text().splitlines()
    assert len(log) == 1 and f"warning: {flag} is off for this model" in log[0]
    assert "flash_attention_2" in log[0]


def test_dpo_prefix_sharing_fallback_is_logged_not_configured(tmp_path, tiny_model_dir,
                                                              no_custom_masks, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(4))
    config = DPOConfig(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / "out"),
                       prefix_sharing=True, **COMMON)
    run_dpo(config)
    check_recorded(tmp_path / "out", config, "prefix_sharing")
    assert "warning: prefix_sharing is off" in capsys.readouterr().out


def test_sft_packing_fallback_is_logged_not_configured(tmp_path, tiny_model_dir,
                                                       no_custom_masks):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(4)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    config = SFTConfig(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / "out"),
                       packing=True, **COMMON)
    run_sft(config)
    check_recorded(tmp_path / "out", config, "packing")


def test_run_log_is_a_run_file_that_overwrite_removes(tmp_path, tiny_model_dir,
                                                      no_custom_masks):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(4)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    config = dict(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / "out"),
                  packing=True, **COMMON)
    run_sft(SFTConfig(**config))
    run_sft(SFTConfig(**config, overwrite=True))
    assert len((tmp_path / "out" / "run.log").read_text().splitlines()) == 1
