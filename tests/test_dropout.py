"""`disable_dropout` (on by default for DPO, KTO, reward and PPO, as in TRL; SFT keeps it).

With dropout on, the policy's log-probs in a training step and the reference's differ by
noise, not by the weights; TRL's DPO/KTO/Reward trainers switch every nn.Dropout off by
default and its PPOTrainer always does.
"""

import argparse
import copy
import tempfile
import warnings

import pytest
import torch
from safetensors.torch import load_file

from helpers import preference_rows
from prefalign.algorithms.dpo import DPO, DPOConfig
from prefalign.algorithms.kto import KTOConfig
from prefalign.algorithms.ppo import PPOConfig
from prefalign.algorithms.reference import AdaptersOff, FrozenCopy
from prefalign.algorithms.reward import RewardConfig
from prefalign.algorithms.sft import SFTConfig
from prefalign.config import add_config_arguments, build_config, config_from_args
from prefalign.data import collate_preferences, load_preferences
from prefalign.errors import ConfigError
from prefalign.logprobs import LogpsModel
from prefalign.lora import ADAPTER_WEIGHTS, lora_layers, save_adapter
from prefalign.train.run import Run


def start_run(config):
    """Run.open, then the trainable model, as a trainer's run does before its loop."""
    run = Run.open(config)
    run.load_model()
    return run


IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 29, 2], [7, 7, 19, 23, 31, 4, 6, 9]])
MASK = torch.ones_like(IDS)


def model_dir(tmp_path, make_model, tokenizer, arch, **overrides):
    path = tmp_path / f"model-{arch}"
    make_model(arch, **overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def randomize_b(model, seed=0):
    """LoRA's B starts at zero, which hides LoRA dropout; a trained adapter has B != 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)


def dpo_run(tmp_path, path, **overrides):
    config = DPOConfig(model=path, data="unused.jsonl", lora_r=4, lora_dropout=0.3,
                       output_dir=tempfile.mkdtemp(dir=tmp_path), **overrides)
    return start_run(config)


@pytest.mark.parametrize("arch, overrides", [("llama", {"attention_dropout": 0.2}),
                                             ("gpt2", {})])  # GPT-2: nn.Dropout 0.1 throughout
def test_dpo_default_gives_equal_logps_in_train_mode(tmp_path, make_model, tokenizer, arch,
                                                     overrides):
    """Two forward passes in training mode (the policy's in a DPO step) give the same
    log-probs by default; with --no-disable-dropout they differ, so dropout was live."""
    path = model_dir(tmp_path, make_model, tokenizer, arch, **overrides)
    for disable in (True, False):
        run = dpo_run(tmp_path, path) if disable else dpo_run(tmp_path, path,
                                                                disable_dropout=False)
        randomize_b(run.model)
        policy = LogpsModel(run.model.train())
        torch.manual_seed(0)
        first = policy(IDS, MASK, MASK.bool()).logps
        second = policy(IDS, MASK, MASK.bool()).logps
        if disable:
            torch.testing.assert_close(first, second, atol=0, rtol=0)
            dropouts = [m for m in run.model.modules() if isinstance(m, torch.nn.Dropout)]
            assert dropouts and all(m.p == 0 for m in dropouts)  # LoRA's lora_dropout too
        else:
            assert not torch.allclose(first, second, atol=1e-4)


def test_defaults_and_flags():
    """On for the preference and RL trainers (TRL: DPO, KTO, Reward default True; PPO always);
    SFT has no switch (TRL's SFTTrainer has none either) and keeps dropout."""
    for cls in (DPOConfig, KTOConfig, RewardConfig, PPOConfig):
        assert cls(model="m", data="d").disable_dropout is True, cls.__name__
    assert not hasattr(SFTConfig(model="m", data="d"), "disable_dropout")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DPOConfig)
    args = parser.parse_args(["--model", "m", "--data", "d", "--no-disable-dropout"])
    assert config_from_args(DPOConfig, args).disable_dropout is False
    assert build_config(KTOConfig, {"model": "m", "data": "d",
                                    "disable_dropout": "false"}).disable_dropout is False
    with pytest.raises(ConfigError, match="disable_dropout"):
        build_config(DPOConfig, {"model": "m", "data": "d", "disable_dropout": "maybe"})


def test_sft_keeps_dropout(tmp_path, make_model, tokenizer):
    path = model_dir(tmp_path, make_model, tokenizer, "gpt2")
    run = start_run(SFTConfig(model=path, data="unused.jsonl", output_dir=str(tmp_path / "o"),
                              lora_r=4, lora_dropout=0.3))
    assert {m.p for m in run.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1, 0.3}


def test_lora_dpo_with_dropout_equals_trl(tmp_path, make_model, tokenizer):
    """GPT-2 (nn.Dropout 0.1 in embeddings, attention and MLP) with lora_dropout 0.3, in
    training mode: prefalign (defaults) and TRL's DPOTrainer on the same PEFT model (TRL's
    defaults, reference = adapters disabled) give the same loss, metrics and LoRA grads."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    path = model_dir(tmp_path, make_model, tokenizer, "gpt2")
    run = dpo_run(tmp_path, path)
    randomize_b(run.model, seed=4)  # the policy differs from its adapter-disabled reference
    adapter = save_adapter(run.model, tmp_path / "adapter", base_model_name_or_path=path)
    # TRL takes a loaded adapter's starting weights as the reference; prefalign's reference
    # is the base (adapters disabled). So TRL gets a fresh adapter of the same config (its
    # reference: adapters disabled) and our weights are copied in after it is built.
    lora_config = peft.LoraConfig.from_pretrained(adapter)
    lora_config.inference_mode = False
    base = AutoModelForCausalLM.from_pretrained(path)
    assert {m.p for m in base.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    rows = preference_rows(5, seed=3)
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows),
                         report_to="none", beta=0.1, use_cpu=True, bf16=False, max_length=None,
                         seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=base, ref_model=None, args=args, peft_config=lora_config,
                                 train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer)
    model = trainer.model.train()
    result = peft.set_peft_model_state_dict(model, load_file(str(adapter / ADAPTER_WEIGHTS)))
    assert not [k for k in result.unexpected_keys if "lora" in k]
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    torch.manual_seed(0)
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    dpo = DPO(run.config, tokenizer.pad_token_id, AdaptersOff())
    features, _ = load_preferences(rows, tokenizer)
    torch.manual_seed(1)  # other dropout draws: only an off dropout makes them agree
    loss, metrics = dpo.compute_loss(LogpsModel(run.model.train()),
                                     collate_preferences(features, tokenizer.pad_token_id))
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    assert loss.item() != pytest.approx(0.6931, abs=1e-3)  # policy != reference
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name
    ours = lora_layers(run.model)
    compared = 0
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict):
            key = name.removeprefix("base_model.model.")
            for part in ("lora_A", "lora_B"):
                torch.testing.assert_close(getattr(ours[key], part).weight.grad,
                                           getattr(module, part)["default"].weight.grad,
                                           atol=1e-5, rtol=1e-4, msg=f"{key}.{part}")
            compared += 1
    assert compared == len(ours) > 0


def test_reference_copy_of_full_finetune_has_no_dropout(tmp_path, make_model, tokenizer):
    """Full fine-tuning: the frozen reference is a copy of the loaded policy, dropout off."""
    path = model_dir(tmp_path, make_model, tokenizer, "gpt2")
    run = start_run(DPOConfig(model=path, data="d", output_dir=str(tmp_path / "o"), lora_r=0))
    reference = copy.deepcopy(run.model)
    assert all(m.p == 0 for m in reference.modules() if isinstance(m, torch.nn.Dropout))


def test_kto_with_dropout_equals_trl(tmp_path, make_model, tokenizer):
    """GPT-2 (nn.Dropout 0.1) fully fine-tuned, in training mode: prefalign's KTO through
    its own loading path (defaults) and TRL's KTOTrainer (defaults) give the same loss,
    KL estimate and gradients: both switched dropout off."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM

    from prefalign.algorithms.kto import KTO
    from prefalign.data.unpaired import load_unpaired

    reference_dir = model_dir(tmp_path, make_model, tokenizer, "gpt2")
    policy_dir = tmp_path / "policy"
    policy = make_model("gpt2")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    policy.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    rows = [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 == 0 else "rejected"],
             "label": i % 2 == 0} for i, r in enumerate(preference_rows(6, seed=3))]
    weights = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    args = trl.KTOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows),
                         report_to="none", use_cpu=True, bf16=False, max_length=None, seed=0,
                         gradient_checkpointing=False, **weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.KTOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir),
                                 ref_model=AutoModelForCausalLM.from_pretrained(reference_dir),
                                 args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer)
    theirs = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    torch.manual_seed(0)
    trl_loss = trainer.compute_loss(theirs, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    run = start_run(KTOConfig(model=str(policy_dir), data="unused.jsonl", lora_r=0,
                              output_dir=tempfile.mkdtemp(dir=tmp_path), **weights))
    frozen = AutoModelForCausalLM.from_pretrained(reference_dir)
    kto = KTO(run.config, tokenizer.pad_token_id, FrozenCopy(frozen))
    features, _ = load_unpaired(rows, tokenizer)
    torch.manual_seed(1)  # other dropout draws: only an off dropout makes them agree
    loss, metrics = kto.compute_loss(LogpsModel(run.model.train()), kto.collate(features))
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name
    for (name, ours_p), theirs_p in zip(run.model.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(ours_p.grad, theirs_p.grad, atol=1e-5, rtol=1e-4, msg=name)
