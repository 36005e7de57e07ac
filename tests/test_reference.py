"""One reference builder for every trainer (make_reference), and the precomputed table.

FSDP and ZeRO-3 need GPUs; on the CPU the path that decides is checked instead: a frozen
reference of a full fine-tuning run goes through train.distributed.prepare_frozen (which
shards it under those engines) in DPO, KTO and PPO alike, and a LoRA run makes no copy.
"""

import copy

import pytest
import torch

from helpers import letter_e, preference_rows, write_jsonl
from prefalign.algorithms.dpo import DPOConfig, run_dpo
from prefalign.algorithms.kto import KTOConfig, run_kto
from prefalign.algorithms.ppo import PPOConfig, run_ppo
from prefalign.algorithms.reference import (
    AdaptersOff,
    FrozenCopy,
    PrecomputedTable,
    precompute_reference_logps,
)
from prefalign.data import collate_preferences, load_preferences
from prefalign.logprobs import LogpsModel
from prefalign.lora import apply_lora, lora_layers
from prefalign.train import distributed
from prefalign.train.run import Run

COMMON = dict(batch_size=2, grad_accum=1, max_steps=1, learning_rate=1e-4, lora_dropout=0.0,
              logging_steps=1, warmup_ratio=0.0, seed=7)


@pytest.fixture
def spies(monkeypatch):
    """Records every model prepare_frozen places and every algorithm Run.fit trains."""
    prepared, algorithms = [], []
    real_prepare, real_fit = distributed.prepare_frozen, Run.fit

    def prepare_frozen(model, accelerator):
        prepared.append(model)
        return real_prepare(model, accelerator)

    def fit(self, algorithm, *args, **kwargs):
        algorithms.append((self, algorithm))
        return real_fit(self, algorithm, *args, **kwargs)

    monkeypatch.setattr(distributed, "prepare_frozen", prepare_frozen)
    monkeypatch.setattr(Run, "fit", fit)
    return prepared, algorithms



def run_trainer(kind, tmp_path, model_dir, lora_r):
    out = str(tmp_path / f"{kind}-{lora_r}")
    common = dict(model=str(model_dir), output_dir=out, lora_r=lora_r, **COMMON)
    if kind == "dpo":
        data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(4))
        return run_dpo(DPOConfig(data=data, **common))
    if kind == "kto":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0}
                for i, r in enumerate(preference_rows(4))]
        return run_kto(KTOConfig(data=write_jsonl(tmp_path / "kto.jsonl", rows), **common))
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review {i}: The film"}
                                                     for i in range(4)])
    return run_ppo(PPOConfig(data=data, max_new_tokens=4, ppo_epochs=1, **common),
                   scorer=letter_e)


@pytest.mark.parametrize("kind", ["dpo", "kto", "ppo"])
def test_full_finetuning_reference_is_a_frozen_copy_prepared_like_the_policy(
        kind, tmp_path, tiny_model_dir, spies):
    prepared, algorithms = spies
    run_trainer(kind, tmp_path, tiny_model_dir, lora_r=0)
    (run, algorithm), = algorithms
    reference = algorithm.reference
    assert isinstance(reference, FrozenCopy)
    # Placed by prepare_frozen (sharded under FSDP / ZeRO-3), once: the reference's scorer.
    assert prepared == [reference.model]
    assert reference.base is not run.model  # a copy of the starting weights, not the policy
    assert not any(p.requires_grad for p in reference.base.parameters())
    assert not reference.base.training


@pytest.mark.parametrize("kind", ["dpo", "kto", "ppo"])
def test_lora_reference_is_the_policy_with_adapters_off_and_no_copy(
        kind, tmp_path, tiny_model_dir, spies):
    prepared, algorithms = spies
    run_trainer(kind, tmp_path, tiny_model_dir, lora_r=4)
    (_, algorithm), = algorithms
    assert isinstance(algorithm.reference, AdaptersOff)
    assert prepared == []


def test_reference_free_loss_has_no_reference(tmp_path, tiny_model_dir, spies):
    prepared, algorithms = spies
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(4))
    run_dpo(DPOConfig(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / "o"),
                      loss_type="simpo", lora_r=0, **COMMON))
    (_, algorithm), = algorithms
    assert algorithm.reference is None and prepared == []


def test_precomputed_full_finetuning_reference_is_a_table(tmp_path, tiny_model_dir, spies):
    """precompute_ref: the table is computed with a prepared frozen copy, then used alone."""
    prepared, algorithms = spies
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(4))
    evals = write_jsonl(tmp_path / "evals.jsonl", preference_rows(2, seed=1))
    run_dpo(DPOConfig(model=str(tiny_model_dir), data=data, eval_data=evals, lora_r=0,
                      precompute_ref=True, output_dir=str(tmp_path / "o"), **COMMON))
    (_, algorithm), = algorithms
    assert isinstance(algorithm.reference, PrecomputedTable)
    assert algorithm.reference.table.shape == (6, 2)  # 4 training + 2 eval pairs
    assert len(prepared) == 1


@pytest.fixture
def pairs(tokenizer):
    features, _ = load_preferences(preference_rows(5), tokenizer)
    for position, feature in enumerate(features):
        feature["index"] = position
    return features


@pytest.mark.parametrize("live", ["frozen", "adapters"])
def test_precomputed_table_equals_the_live_reference_and_leaves_features_alone(
        live, pairs, make_model, tmp_path):
    model = make_model("llama")
    if live == "frozen":
        policy, reference = LogpsModel(model), FrozenCopy(make_model("llama", seed=1))
    else:
        apply_lora(model, r=4, alpha=8)
        torch.manual_seed(3)
        for layer in lora_layers(model).values():  # B != 0: the adapters change the numbers
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        policy, reference = LogpsModel(model), AdaptersOff()
    before = copy.deepcopy(pairs)

    def collate(features):
        return collate_preferences(features, 0)

    logps = precompute_reference_logps(pairs, reference, policy, collate, 2, torch.device("cpu"),
                                       tmp_path / "cache", "identity")
    table = PrecomputedTable.from_rows([(pairs, logps)])
    batch = collate([pairs[3], pairs[0], pairs[4]])  # another order than the table's rows
    expected = reference(policy, *batch.inputs())
    got = table(policy, *batch.inputs(), index=batch.index)
    assert got.shape == (6,)  # chosen rows, then rejected rows
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert pairs == before and "ref_chosen_logps" not in pairs[0]
    # The cache on disk serves a second run the same numbers, without scoring again.
    assert len(list((tmp_path / "cache").glob("ref_logps-*.safetensors"))) == 1
    again = precompute_reference_logps(pairs, None, None, collate, 2, torch.device("cpu"),
                                       tmp_path / "cache", "identity")
    torch.testing.assert_close(again, logps, atol=0, rtol=0)


def test_precomputed_table_needs_the_row_index(pairs):
    table = PrecomputedTable(torch.zeros(5, 2))
    batch = collate_preferences(pairs[:2], 0)
    with pytest.raises(ValueError, match="row index"):
        table(None, *batch.inputs())
