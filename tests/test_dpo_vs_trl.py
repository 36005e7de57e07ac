"""prefalign's DPO against TRL's DPOTrainer on the same tiny model, data and batch (fp32)."""

import copy
import tempfile
import warnings

import pytest
import torch

from helpers import preference_rows
from prefalign.algorithms.dpo import DPO, DPOConfig
from prefalign.algorithms.reference import FrozenCopy
from prefalign.data import collate_preferences, load_preferences
from prefalign.logprobs import LogpsModel

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def perturbed(model, seed=1, scale=0.02):
    """The policy must differ from the reference, or every log-ratio is zero."""
    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return policy


CONVERSATIONS = [
    {"prompt": [{"role": "user", "content": "Say something kind."}],
     "chosen": [{"role": "assistant", "content": "You did well."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": [{"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello, how are you?"}],
     "rejected": [{"role": "assistant", "content": "Hello"}]},
    {"prompt": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"},
                {"role": "user", "content": "Another"}],
     "chosen": [{"role": "assistant", "content": "Green"}],
     "rejected": [{"role": "assistant", "content": "Blue again, the same as before"}]},
]


@pytest.fixture(params=["text", "conversational"])
def setup(request, make_model, tokenizer):
    reference = make_model("llama")
    policy = perturbed(reference)
    rows = preference_rows(5, seed=3) if request.param == "text" else CONVERSATIONS
    return policy, reference, rows, tokenizer


def trl_trainer(policy, reference, rows, tokenizer, beta=0.1):
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows),
                         report_to="none", beta=beta, use_cpu=True, bf16=False, max_length=None,
                         seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                              train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tokenizer)


def test_tokenized_batch_equals_trl(setup):
    policy, reference, rows, tokenizer = setup
    trainer = trl_trainer(policy, reference, rows, tokenizer)
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    features, _ = load_preferences(rows, tokenizer)
    ours = collate_preferences(features, tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        torch.testing.assert_close(ours[key].long(), theirs[key].long(), msg=key)


def test_loss_rewards_logps_and_gradients_equal_trl(setup):
    policy, reference, rows, tokenizer = setup
    trainer = trl_trainer(copy.deepcopy(policy), copy.deepcopy(reference), rows, tokenizer)
    theirs_model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trl_loss = trainer.compute_loss(theirs_model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    config = DPOConfig(model="x", data="x", beta=0.1, lora_r=0)
    dpo = DPO(config, tokenizer.pad_token_id, FrozenCopy(copy.deepcopy(reference)))
    features, _ = load_preferences(rows, tokenizer)
    ours_model = LogpsModel(policy.train())
    loss, metrics = dpo.compute_loss(ours_model, dpo.collate(features))
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) < 1e-5
    assert loss.item() != pytest.approx(0.6931, abs=1e-3)  # the comparison is not trivial
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name
    for (name, ours_p), theirs_p in zip(policy.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(ours_p.grad, theirs_p.grad, atol=1e-5, rtol=1e-4, msg=name)
