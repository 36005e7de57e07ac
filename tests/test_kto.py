"""KTO: unpaired data, the KL batch, compute_loss against TRL's KTOTrainer, training runs."""

import copy
import tempfile
import warnings

import pytest
import torch

from helpers import preference_rows, write_jsonl
from prefalign.algorithms.kto import KTO, KTOConfig, gather_across_processes, run_kto
from prefalign.algorithms.reference import FrozenCopy
from prefalign.data import load_preferences
from prefalign.data.unpaired import (
    collate_unpaired,
    load_unpaired,
    mismatched_pairs,
    weight_balance_note,
)
from prefalign.errors import ConfigError, DataError
from prefalign.logprobs import LogpsModel
from prefalign.train.metrics import read_metrics


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def thumbs(n, seed=0):
    """Unpaired rows from the preference task: praise is desirable, complaints are not."""
    rows = []
    for i, pair in enumerate(preference_rows(n, seed)):
        good = i % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"],
                     "label": good})
    return rows


def dpo_ids(prompt, completion, tokenizer):
    """data.tokenize's ids for (prompt, completion): what KTO must reproduce."""
    other = " x" if isinstance(completion, str) else [assistant("x")]
    features, _ = load_preferences([{"prompt": prompt, "chosen": completion, "rejected": other}],
                                   tokenizer)
    return features[0]["prompt_input_ids"], features[0]["chosen_input_ids"]


# ---------------------------------------------------------------- loading unpaired rows


def test_each_unpaired_form_tokenizes_like_dpo(tokenizer):
    rows = [
        {"prompt": "The film 1:", "completion": " was great fun.", "label": True, "id": "a"},
        {"prompt": [user("Hi")], "completion": [assistant("Hello!")], "label": False, "weight": 2},
        {"prompt": "Hi", "completion": [assistant("Go away.")], "label": True, "source": "s"},
        {"completion": [user("Hi"), assistant("Yo"), user("Again"), assistant("Hello")],
         "label": False},
    ]
    features, report = load_unpaired(rows, tokenizer)
    assert report.kind == "unpaired"
    assert dict(report.normalize.formats) == {"text": 1, "conversational": 3}
    assert (report.desirable, report.undesirable) == (2, 2)
    assert [f["label"] for f in features] == [True, False, True, False]
    assert (features[0]["id"], features[1]["weight"], features[2]["source"]) == ("a", 2.0, "s")
    expected = [
        ("The film 1:", " was great fun."),
        ([user("Hi")], [assistant("Hello!")]),
        ([user("Hi")], [assistant("Go away.")]),
        ([user("Hi"), assistant("Yo"), user("Again")], [assistant("Hello")]),
    ]
    for feature, (prompt, completion) in zip(features, expected):
        prompt_ids, completion_ids = dpo_ids(prompt, completion, tokenizer)
        assert feature["prompt_input_ids"] == prompt_ids
        assert feature["completion_input_ids"] == completion_ids
    assert features[0]["completion_input_ids"][-1] == tokenizer.eos_token_id  # EOS once
    assert features[0]["completion_input_ids"].count(tokenizer.eos_token_id) == 1


def test_labels_from_csv_text_and_integers(tmp_path, tokenizer):
    csv = tmp_path / "thumbs.csv"
    csv.write_text("prompt,completion,label,weight\n"
                   "Q1,A1,true,\nQ2,A2,FALSE,0.5\nQ3,A3,1,\nQ4,A4,0,2\n", encoding="utf-8")
    features, report = load_unpaired(str(csv), tokenizer)
    assert [f["label"] for f in features] == [True, False, True, False]
    assert [f.get("weight") for f in features] == [None, 0.5, None, 2.0]
    jsonl = write_jsonl(tmp_path / "ints.jsonl", [
        {"prompt": "Q", "completion": "A", "label": 1},
        {"prompt": "Q", "completion": "B", "label": 0}])
    assert [f["label"] for f in load_unpaired(jsonl, tokenizer)[0]] == [True, False]


@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "Q", "completion": "A"}, "label", "missing"),
    ({"prompt": "Q", "completion": "A", "label": "maybe"}, "label", "true or false"),
    ({"prompt": "Q", "completion": "A", "label": 2}, "label", "true or false"),
    ({"prompt": "Q", "label": True}, "completion", "missing"),
    ({"prompt": "Q", "completion": 7, "label": True}, "completion", "string or a list"),
    ({"completion": "A", "label": True}, "prompt", "missing"),
    ({"prompt": "Q", "completion": "A", "label": True, "weight": -1}, "weight", ">= 0"),
    ({"prompt": [user("Q"), assistant("A")], "completion": [assistant("B")], "label": True},
     "prompt", "ends with an assistant turn"),
    ({"prompt": "Q", "completion": [{"role": "bot", "content": "A"}], "label": True},
     "completion", "role"),
    ({"prompt": "Q", "chosen": "A", "rejected": "B"}, "chosen", "one kind of row per file"),
])
def test_bad_rows_name_origin_and_field(tmp_path, tokenizer, row, field, words):
    good = {"prompt": "Q", "completion": "A", "label": True}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as info:
        load_unpaired(path, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and f"'{field}'" in message and words in message


def test_empty_completions_are_dropped_with_a_count_or_refused_when_strict(tmp_path, tokenizer):
    rows = [{"prompt": "Q", "completion": "A", "label": True},
            {"prompt": "Q", "completion": "  ", "label": False},
            {"prompt": [user("Q")], "completion": [assistant("")], "label": True}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    features, report = load_unpaired(path, tokenizer)
    assert len(features) == 1 and dict(report.normalize.dropped) == {"empty completion": 2}
    assert "2 dropped (empty completion: 2)" in report.describe()
    with pytest.raises(DataError, match=r"t\.jsonl:2: empty completion"):
        load_unpaired(path, tokenizer, strict=True)


# ---------------------------------------------------------------- paired data is unpaired


def test_pairs_of_every_format_become_two_rows(tokenizer):
    pairs = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "weight": 3, "id": 1},
        {"chosen": "The sun is hot.", "rejected": "The sun is cold."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: No."},
        {"chosen": [user("Hi"), assistant("Hello.")], "rejected": [user("Hi"), assistant("No.")]},
        {"prompt": "Same", "chosen": " a", "rejected": " a"},  # no signal: dropped, as for DPO
    ]
    features, report = load_unpaired(pairs, tokenizer)
    assert report.kind == "paired" and report.normalize.n_dropped == 1
    assert len(features) == 8 and [f["label"] for f in features] == [True, False] * 4
    dpo, _ = load_preferences(pairs[:4], tokenizer)
    for pair, (good, bad) in zip(dpo, zip(features[::2], features[1::2])):
        assert good["prompt_input_ids"] == bad["prompt_input_ids"] == pair["prompt_input_ids"]
        assert good["completion_input_ids"] == pair["chosen_input_ids"]
        assert bad["completion_input_ids"] == pair["rejected_input_ids"]
    assert features[0]["weight"] == features[1]["weight"] == 3.0
    assert features[0]["id"] == features[1]["id"] == 1


# ---------------------------------------------------------------- the KL batch


def test_kl_batch_pairs_each_prompt_with_the_previous_rows_completion():
    """Prompts P0=[1,2], P1=[3], P2=[4,5,6]; completions C0=[7], C1=[8,9], C2=[10].
    Shift by one: row 0 gets C2, row 1 gets C0, row 2 gets C1 (TRL's rotation).
    KL rows: [1,2,10], [3,7], [4,5,6,8,9], padded with 0 on the right to 5 columns.
    With max_length 4, row 2's completion keeps 4 - 3 = 1 token: [4,5,6,8]."""
    features = [
        {"prompt_input_ids": [1, 2], "completion_input_ids": [7], "label": True},
        {"prompt_input_ids": [3], "completion_input_ids": [8, 9], "label": False},
        {"prompt_input_ids": [4, 5, 6], "completion_input_ids": [10], "label": True},
    ]
    batch = collate_unpaired(features, pad_token_id=0)
    assert batch["kl_input_ids"].tolist() == [[1, 2, 10, 0, 0], [3, 7, 0, 0, 0], [4, 5, 6, 8, 9]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5]
    assert batch["kl_completion_mask"].int().tolist() == [
        [0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["input_ids"].tolist() == [[1, 2, 7, 0], [3, 8, 9, 0], [4, 5, 6, 10]]
    assert batch["completion_mask"].int().tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]]
    assert batch["label"].tolist() == [True, False, True]
    assert mismatched_pairs(features, max_length=4)[2] == ([4, 5, 6], [8])


# ---------------------------------------------------------------- against TRL's KTOTrainer

CONVERSATION_PAIRS = [
    {"prompt": [user("Say something kind.")], "chosen": [assistant("You did well.")],
     "rejected": [assistant("No.")]},
    {"prompt": [user("Hi")], "chosen": [assistant("Hello, how are you?")],
     "rejected": [assistant("Hello")]},
    {"prompt": [user("Name a colour"), assistant("Blue"), user("Another")],
     "chosen": [assistant("Green")], "rejected": [assistant("Blue again, the same as before")]},
]


def tuned(model, batch, steps=3):
    """A policy that differs from the reference: a few likelihood steps on the completions.

    Random noise would mostly lower every log-prob, leaving z0 clamped at 0; raising the
    completions' log-probs raises them in the mismatched pairs too, so z0 > 0 is compared."""
    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.01)
    scorer = LogpsModel(policy)
    for _ in range(steps):
        out = scorer(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        (-out.logps.mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return policy


def trl_trainer(policy, reference, rows, tokenizer, n, **kwargs):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    args = trl.KTOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n,
                         report_to="none", use_cpu=True, bf16=False, max_length=None, seed=0,
                         gradient_checkpointing=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.KTOTrainer(model=policy, ref_model=reference, args=args,
                              train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tokenizer)


@pytest.mark.parametrize("kind", ["text-unpaired", "conversational-paired"])
def test_compute_loss_equals_trl(make_model, tokenizer, kind):
    """Same tiny model, batch and reference: equal batch (KL rows included), loss, rewards,
    z0 and gradients. TRL unpairs chosen rows first, then rejected rows: ours are reordered
    to that order so both batches hold the same rows in the same places."""
    rows = thumbs(6, seed=3) if kind == "text-unpaired" else CONVERSATION_PAIRS
    weights = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    features, _ = load_unpaired(rows, tokenizer)
    if kind == "conversational-paired":
        features = features[::2] + features[1::2]
    n = len(features)
    reference = make_model("llama")
    policy = tuned(reference, collate_unpaired(features, tokenizer.pad_token_id))
    trainer = trl_trainer(copy.deepcopy(policy), copy.deepcopy(reference), rows, tokenizer, n,
                          **weights)
    theirs_model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])

    config = KTOConfig(model="x", data="x", lora_r=0, **weights)
    kto = KTO(config, tokenizer.pad_token_id, FrozenCopy(copy.deepcopy(reference)))
    ours = kto.collate(features)
    torch.testing.assert_close(ours["label"], batch["label"])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        torch.testing.assert_close(ours[key].long(), batch[key].long(), msg=key)
        torch.testing.assert_close(ours[f"kl_{key}"].long(), batch[f"KL_{key}"].long(), msg=key)

    trl_loss = trainer.compute_loss(theirs_model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    ours_model = LogpsModel(policy.train())
    loss, metrics = kto.compute_loss(ours_model, ours)
    loss.backward()

    assert metrics["kl"].item() > 0.01  # z0 is not clamped away: the KL path is compared
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name
    for (name, ours_p), theirs_p in zip(policy.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(ours_p.grad, theirs_p.grad, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- training runs


def config(tmp_path, model_dir, data, **overrides):
    base = dict(model=str(model_dir), data=data, output_dir=str(tmp_path / "out"), batch_size=8,
                grad_accum=1, max_steps=3, learning_rate=5e-3, lora_r=8, lora_dropout=0.0,
                logging_steps=1, warmup_ratio=0.0, seed=7, lr_scheduler="constant")
    base.update(overrides)
    return KTOConfig(**base)


def test_kto_learns_and_writes_artifacts(tmp_path, tiny_model_dir):
    """LoRA: adapters start at zero, so the policy equals its adapter-disabled reference and
    the first loss is exactly 0.5 (1 - sigmoid(0)) with z0 = 0. Then the loss falls and the
    desirable rows' rewards rise above the undesirable rows'."""
    data = write_jsonl(tmp_path / "thumbs.jsonl", thumbs(64))
    result = run_kto(config(tmp_path, tiny_model_dir, data, max_steps=20, beta=0.5))
    first = result.history[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == 0.0
    late = result.history[-4:]
    mean = lambda key: sum(r[key] for r in late) / len(late)  # noqa: E731
    assert mean("loss") < 0.45
    assert mean("rewards/chosen") > 0 > mean("rewards/rejected")
    assert mean("rewards/margins") > 0.5

    out = tmp_path / "out"
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert "desirable_weight: 1.0" in (out / "config.yaml").read_text()
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "logps/chosen", "logps/rejected", "lr", "grad_norm"):
        assert key in records[-1], key


def test_full_finetuning_uses_a_frozen_copy_and_paired_files(tmp_path, tiny_model_dir):
    """lora_r=0: the reference is a frozen copy of the starting weights, so the first loss is
    0.5 as well; a paired file trains directly (each pair gives two rows)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(8))
    result = run_kto(config(tmp_path, tiny_model_dir, data, max_steps=2, lora_r=0,
                            learning_rate=1e-4))
    assert result.history[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert result.history[1]["loss"] != pytest.approx(0.5, abs=1e-6)  # the policy moved
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------- small contracts


def test_gather_concatenates_uneven_process_shares():
    """Process 0 holds 3 values, process 1 holds 2 (padded with 0 to 3 by accelerate):
    the gathered result is every real value once, padding dropped."""
    mine, theirs = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])

    class TwoProcesses:
        def gather(self, t):
            if t.dtype == torch.long:  # the sizes: process 1 holds 2 values
                return torch.cat([t, torch.tensor([2])])
            return torch.cat([t, theirs, t.new_zeros(1)])

        def pad_across_processes(self, t, dim=0):
            return t

    gathered = gather_across_processes(TwoProcesses())(mine)
    torch.testing.assert_close(gathered, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))


def test_config_and_balance_rules():
    with pytest.raises(ConfigError, match="batch_size"):
        KTOConfig(model="m", data="d", batch_size=1).validate()
    with pytest.raises(ConfigError, match="undesirable_weight"):
        KTOConfig(model="m", data="d", undesirable_weight=0.0).validate()
    # 100 desirable, 300 undesirable, weights 1/1: ratio 1/3 -> advise desirable_weight 3..4.
    note = weight_balance_note(100, 300, 1.0, 1.0)
    assert note is not None and "[3, 4]" in note
    assert weight_balance_note(100, 300, 3.5, 1.0) is None  # ratio 7/6 lies in [1, 4/3]
    assert weight_balance_note(100, 0, 1.0, 1.0) is None
