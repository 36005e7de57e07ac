"""SFT: instruction data and masks, the loss against hand values, naive cross-entropy and
TRL's SFTTrainer, token-weighted accumulation, memorisation, artifacts, the SFT -> DPO handoff."""

import copy
import json
import math
import tempfile
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import preference_rows, write_jsonl
from prefalign.algorithms.dpo import DPOConfig, run_dpo
from prefalign.algorithms.reference import AdaptersOff
from prefalign.algorithms.sft import (
    SFT,
    PerplexityWindow,
    SFTConfig,
    TopOneLogpsModel,
    run_sft,
)
from prefalign.data import collate_preferences, load_preferences
from prefalign.data.instructions import collate_instructions, load_instructions, loss_token_count
from prefalign.errors import DataError
from prefalign.logprobs import LogpsModel
from prefalign.lora import ADAPTER_CONFIG, load_adapter
from prefalign.models import load_causal_lm, load_tokenizer, prepare_for_training
from prefalign.train.metrics import read_metrics


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def instruction_rows(n, seed=0):
    """Prompt/completion rows from the preference task, completions of unequal length."""
    return [{"prompt": r["prompt"], "completion": r["chosen"] + " Yes." * (i % 3)}
            for i, r in enumerate(preference_rows(n, seed))]


def sft_config(tmp_path, model_dir, data, **overrides):
    base = dict(model=str(model_dir), data=data, output_dir=str(tmp_path / "out"), batch_size=4,
                grad_accum=1, max_steps=2, learning_rate=1e-3, lora_r=4, lora_dropout=0.0,
                logging_steps=1, warmup_ratio=0.0, seed=7, lr_scheduler="constant")
    base.update(overrides)
    return SFTConfig(**base)


def masked_text(tokenizer, feature):
    """The completion with tokens outside completion_mask shown as '_'."""
    ids, mask = feature["completion_input_ids"], feature["completion_mask"]
    return "".join(tokenizer.decode([i]) if m else "_" for i, m in zip(ids, mask))


# ---------------------------------------------------------------- data


def test_each_form_tokenizes_like_dpo_and_masks_every_assistant_turn(tokenizer):
    rows = [
        {"prompt": "The film 1:", "completion": " was great fun.", "id": "a"},
        {"prompt": [user("Hi")], "completion": [assistant("Hello!")], "source": "s"},
        {"messages": [user("Hi"), assistant("Hello!")]},
        {"messages": [user("Hi"), assistant("Yo"), user("Again"), assistant("Hello")]},
        {"text": "The sea is wide."},
    ]
    features, report = load_instructions(rows, tokenizer)
    assert dict(report.normalize.formats) == {
        "prompt-completion": 1, "conversational": 1, "messages": 2, "text": 1}
    assert (features[0]["id"], features[1]["source"]) == ("a", "s")
    dpo, _ = load_preferences([
        {"prompt": "The film 1:", "chosen": " was great fun.", "rejected": " no"},
        {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("No")]},
    ], tokenizer)
    for ours, pair in zip(features[:2], dpo):
        assert ours["prompt_input_ids"] == pair["prompt_input_ids"]
        assert ours["completion_input_ids"] == pair["chosen_input_ids"]
        assert all(ours["completion_mask"])
    # A conversation ending in its only assistant turn == the same split into prompt/completion.
    for key in ("prompt_input_ids", "completion_input_ids", "completion_mask"):
        assert features[2][key] == features[1][key], key
    eos = tokenizer.eos_token
    prompt = tokenizer.decode(features[3]["prompt_input_ids"])
    assert prompt == f"<|user|>\nHi{eos}\n<|assistant|>\n"
    # The user turn between the replies is excluded; each reply keeps its end-of-turn.
    assert masked_text(tokenizer, features[3]) == f"Yo{eos}\n" + "_" * 10 + f"Hello{eos}\n"
    # Language-model text: no prompt (this tokenizer adds no BOS), EOS appended once.
    assert features[4]["prompt_input_ids"] == []
    assert tokenizer.decode(features[4]["completion_input_ids"]) == f"The sea is wide.{eos}"
    again, _ = load_instructions([{"text": f"The sea is wide.{eos}"}], tokenizer)
    assert again[0]["completion_input_ids"] == features[4]["completion_input_ids"]


def test_collated_masks_by_hand():
    """Row A: prompt [5, 6], completion [7, 8], mask [1, 1].
    Row B: prompt [9], completion [10, 11, 12, 13], mask [1, 0, 0, 1] (a user turn between
    two replies). Right padding with 0 to 5 columns.
    completion_only_loss: A -> [0,0,1,1,0], B -> [0,1,0,0,1]; off: every real token,
    A -> [1,1,1,1,0], B -> [1,1,1,1,1]. Padding is never True.
    Loss tokens (position 0 has no prefix): 2 + 2 = 4 completion-only, 3 + 4 = 7 all."""
    features = [
        {"prompt_input_ids": [5, 6], "completion_input_ids": [7, 8], "completion_mask": [1, 1]},
        {"prompt_input_ids": [9], "completion_input_ids": [10, 11, 12, 13],
         "completion_mask": [1, 0, 0, 1]},
    ]
    batch = collate_instructions(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["completion_mask"].int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]]
    everything = collate_instructions(features, pad_token_id=0, completion_only_loss=False)
    assert everything["completion_mask"].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert everything["input_ids"].tolist() == batch["input_ids"].tolist()
    for only, expected in ((True, 4), (False, 7)):
        sft = SFT(SFTConfig(model="m", data="d", completion_only_loss=only), pad_token_id=0)
        assert sft.units(features) == expected
        assert sum(loss_token_count(f, only) for f in features) == expected


@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "Q"}, "messages", "expected field"),
    ({"prompt": "Q", "chosen": "A", "rejected": "B"}, "messages", "prefalign dpo"),
    ({"completion": "A"}, "prompt", "missing"),
    ({"prompt": "Q", "completion": 7}, "completion", "string or a list"),
    ({"messages": "Hi"}, "messages", "list of messages"),
    ({"messages": [user("Hi")]}, "messages", "no assistant turn"),
    ({"messages": [user("Hi"), {"role": "bot", "content": "x"}]}, "messages", "role"),
    ({"text": 3}, "text", "must be a string"),
    ({"text": "x", "id": 1.5}, "id", "string or an integer"),
    ({"prompt": [user("Q"), assistant("A")], "completion": [assistant("B")]}, "prompt",
     "ends with an assistant turn"),
])
def test_bad_rows_name_origin_and_field(tmp_path, tokenizer, row, field, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, row])
    with pytest.raises(DataError) as info:
        load_instructions(path, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and f"'{field}'" in message and words in message


def test_empty_completions_are_dropped_with_a_count_or_refused_when_strict(tmp_path, tokenizer):
    rows = [{"prompt": "Q", "completion": "A"}, {"prompt": "Q", "completion": " "},
            {"text": ""}, {"messages": [user("Q"), assistant(""), user("R"), assistant(" ")]},
            {"messages": [user("Q"), assistant(""), user("R"), assistant("ok")]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    features, report = load_instructions(path, tokenizer)
    assert len(features) == 2 and dict(report.normalize.dropped) == {"empty completion": 3}
    assert "3 dropped (empty completion: 3)" in report.describe()
    with pytest.raises(DataError, match=r"t\.jsonl:2: empty completion"):
        load_instructions(path, tokenizer, strict=True)


def test_truncation_cuts_prompts_left_and_completions_right(tokenizer):
    rows = [{"prompt": "one two three four five six", "completion": " seven eight nine ten"},
            {"messages": [user("a b c d e f g"), assistant("h i"), user("j"), assistant("k l m")]},
            {"prompt": "Q", "completion": " A"}]
    full, _ = load_instructions(rows, tokenizer, max_length=None, max_prompt_length=None)
    cut, report = load_instructions(rows, tokenizer, max_length=12, max_prompt_length=4)
    for whole, part in zip(full, cut):
        n_prompt = len(part["prompt_input_ids"])
        assert n_prompt == min(4, len(whole["prompt_input_ids"]))
        assert part["prompt_input_ids"] == whole["prompt_input_ids"][-n_prompt:]
        n = len(part["completion_input_ids"])
        assert n_prompt + n == min(12, n_prompt + len(whole["completion_input_ids"]))
        assert part["completion_input_ids"] == whole["completion_input_ids"][:n]
        assert part["completion_mask"] == whole["completion_mask"][:n]
    assert (report.truncated_prompts, report.truncated_completions) == (2, 2)
    assert "truncated: 2 prompts, 2 completions" in report.describe()


def test_bos_stays_in_front_and_never_counts_as_a_loss_token(tokenizer):
    """A tokenizer that adds BOS (as Llama's does): a text row is the completion of the
    prompt [BOS]; a cut prompt keeps BOS in front (data.tokenize's rule)."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows = [{"text": "The sea is wide and blue and deep."},
            {"prompt": "one two three four", "completion": " A"}]
    features, _ = load_instructions(rows, tok, max_length=8, max_prompt_length=3)
    text_ids = tok(rows[0]["text"], add_special_tokens=False)["input_ids"]
    assert features[0]["prompt_input_ids"] == [bos]
    assert features[0]["completion_input_ids"] == (text_ids + [eos])[:7]
    assert loss_token_count(features[0]) == loss_token_count(features[0], False) == 7
    prompt_ids = tok("one two three four", add_special_tokens=False)["input_ids"]
    assert features[1]["prompt_input_ids"] == [bos] + prompt_ids[-2:]


# ---------------------------------------------------------------- the loss


class Bigram(nn.Module):
    """logits(next | token k) = table[k]: a causal LM whose predictions are set by hand."""

    def __init__(self, table):
        super().__init__()
        vocab = table.shape[0]
        self.config = SimpleNamespace()  # no logit transforms: the plain LM-head path
        self.base_model = OneHot(vocab)
        self.head = nn.Linear(vocab, vocab, bias=False)
        self.head.weight.data = table.T.clone()

    def get_output_embeddings(self):
        return self.head


class OneHot(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, **_):
        hidden = nn.functional.one_hot(input_ids, self.vocab).float()
        return SimpleNamespace(last_hidden_state=hidden)


def test_loss_and_token_accuracy_by_hand():
    """Vocabulary {0, 1, 2}; table[0] = [ln 2, 0, 0] -> p(.|0) = [1/2, 1/4, 1/4], argmax 0;
    table[1] = [0, 0, ln 2] -> p(.|1) = [1/4, 1/4, 1/2], argmax 2;
    table[2] = [0, ln 3, 0] -> p(.|2) = [1/5, 3/5, 1/5], argmax 1.
    Row A: prompt [0], completion [1, 2, 1]: targets 1|0 (1/4, miss), 2|1 (1/2, hit),
    1|2 (3/5, hit). Row B: prompt [0, 1], completion [2] (+ one pad): 2|1 (1/2, hit).
    Token mean over the batch's 4 tokens: loss = (ln 4 + ln 2 + ln 5/3 + ln 2) / 4,
    accuracy 3/4 (a mean of row means would give a different loss).
    All tokens (completion_only_loss off) adds B's 1|0 (1/4, miss): 5 tokens,
    loss = (ln 4 + ln 2 + ln 5/3 + ln 4 + ln 2) / 5, accuracy 3/5."""
    table = torch.tensor([[math.log(2), 0, 0], [0, 0, math.log(2)], [0, math.log(3), 0]])
    model = TopOneLogpsModel(Bigram(table))
    features = [
        {"prompt_input_ids": [0], "completion_input_ids": [1, 2, 1], "completion_mask": [1, 1, 1]},
        {"prompt_input_ids": [0, 1], "completion_input_ids": [2], "completion_mask": [1]},
    ]
    ln = math.log
    cases = ((True, (ln(4) + ln(2) + ln(5 / 3) + ln(2)) / 4, 3 / 4),
             (False, (ln(4) + ln(2) + ln(5 / 3) + ln(4) + ln(2)) / 5, 3 / 5))
    for only, loss_value, accuracy in cases:
        sft = SFT(SFTConfig(model="m", data="d", completion_only_loss=only), pad_token_id=0)
        loss, metrics = sft.compute_loss(model, sft.collate(features))
        assert loss.item() == pytest.approx(loss_value, abs=1e-6)
        assert metrics["token_accuracy"].item() == pytest.approx(accuracy, abs=1e-6)


def tuned(model, batch, steps=5):
    """A few likelihood steps, so the compared accuracy is neither 0 nor 1."""
    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(steps):
        out = LogpsModel(policy)(batch["input_ids"], batch["attention_mask"],
                                 batch["completion_mask"])
        (-out.token_logps.sum() / out.mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return policy


@pytest.mark.parametrize("only", [True, False])
def test_loss_equals_naive_cross_entropy_on_every_path(make_model, tokenizer, only):
    """The plain head path, chunked (3 tokens at a time) and the model's-own-logits fallback
    all give F.cross_entropy's token mean and the argmax accuracy of the full logits."""
    rows = instruction_rows(5) + [
        {"messages": [user("Hi"), assistant("Yo"), user("Again"), assistant("Hello there")]}]
    features, _ = load_instructions(rows, tokenizer)
    sft = SFT(SFTConfig(model="m", data="d", completion_only_loss=only), tokenizer.pad_token_id)
    batch = sft.collate(features)
    model = tuned(make_model("llama"), batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(~batch["completion_mask"], -100)[:, 1:]
    expected = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())
    keep = labels != -100
    accuracy = (logits[:, :-1].argmax(-1) == labels)[keep].float().mean()
    assert 0 < accuracy < 1
    fallback = copy.deepcopy(model)
    fallback.config.logit_scale = 2.0  # ignored by Llama, but routes to the fallback path
    for scorer in (TopOneLogpsModel(model), TopOneLogpsModel(model, chunk_size=3),
                   TopOneLogpsModel(fallback)):
        loss, metrics = sft.compute_loss(scorer, batch)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
        assert metrics["token_accuracy"].item() == pytest.approx(accuracy.item(), abs=1e-6)


def test_perplexity_is_exp_of_the_window_token_mean():
    """Micro-batches with mean losses 1 (1 token) and 3 (3 tokens): the window's token mean
    is 2.5, perplexity e^2.5 = 12.18, not the token-weighted mean of e^1 and e^3 (15.74)."""
    window = PerplexityWindow()
    window.add({"loss": torch.tensor(1.0)}, weight=1.0)
    window.add({"loss": torch.tensor(3.0)}, weight=3.0)
    means = window.means()
    assert means["loss"] == pytest.approx(2.5)
    assert means["perplexity"] == pytest.approx(math.exp(2.5))


# ---------------------------------------------------------------- against TRL's SFTTrainer

# TRL's assistant-only mask needs {% generation %} markers; this renders exactly like
# prefalign.tiny.CHAT_TEMPLATE, which prefalign uses without markers.
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token + '\n' }}"
    "{% endgeneration %}{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CONVERSATIONS = [
    {"messages": [user("Hi"), assistant("Yo"), user("Again"), assistant("Hello there")]},
    {"messages": [{"role": "system", "content": "Be kind."}, user("Name a colour"),
                  assistant("Blue"), user("Another"), assistant("Green, the colour of grass")]},
    {"messages": [user("Hi"), assistant("The sea is wide and blue and deep.")]},
]
TRL_CASES = {  # name: (rows, TRL options, prefalign's completion_only_loss)
    "prompt-completion": (instruction_rows(4, seed=3), {}, True),
    "prompt-completion-all": (instruction_rows(4, seed=3), {"completion_only_loss": False}, False),
    "conversational": ([{"prompt": [user(r["prompt"])], "completion": [assistant(r["completion"])]}
                        for r in instruction_rows(3, seed=5)], {}, True),
    "text": ([{"text": r["prompt"] + r["completion"]} for r in instruction_rows(4, seed=4)], {},
             True),
    "messages-assistant-only": (CONVERSATIONS, {"assistant_only_loss": True}, True),
    "messages-all": (CONVERSATIONS, {}, False),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_loss_accuracy_and_gradients_equal_trl(make_model, tokenizer, case):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows, options, only = TRL_CASES[case]
    features, _ = load_instructions(rows, tokenizer)
    sft = SFT(SFTConfig(model="m", data="d", completion_only_loss=only), tokenizer.pad_token_id)
    ours = sft.collate(features)
    policy = tuned(make_model("llama"), ours)

    theirs_tokenizer = copy.deepcopy(tokenizer)
    if options.get("assistant_only_loss"):
        theirs_tokenizer.chat_template = MARKED_TEMPLATE
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows),
                         report_to="none", use_cpu=True, bf16=False, seed=0, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=copy.deepcopy(policy), args=args,
                                 train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=theirs_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    assert torch.equal(ours["input_ids"], batch["input_ids"])
    assert torch.equal(ours["completion_mask"], batch["labels"] != -100)
    theirs_model = trainer.model.train()
    trl_loss = trainer.compute_loss(theirs_model, batch)
    trl_loss.backward()
    trl_accuracy = trainer._metrics["train"]["mean_token_accuracy"][-1]

    loss, metrics = sft.compute_loss(TopOneLogpsModel(policy.train()), ours)
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    assert 0 < trl_accuracy < 1
    assert metrics["token_accuracy"].item() == pytest.approx(trl_accuracy, abs=1e-6)
    for (name, p), q in zip(policy.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- training runs


def test_accumulation_1x8_equals_8x1_token_weighted(tmp_path, tiny_model_dir, tokenizer):
    """8 rows whose completions have 6 to 14 tokens, two steps: one micro-batch of 8 equals
    8 micro-batches of 1 (each weighted by its share of the step's tokens). The first loss is
    the token mean of all 8 rows under the starting model (LoRA starts as the identity),
    which is measurably not the mean of the rows' own means."""
    rows = instruction_rows(16)
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    one = run_sft(sft_config(tmp_path / "a", tiny_model_dir, data, batch_size=8))
    many = run_sft(sft_config(tmp_path / "b", tiny_model_dir, data, batch_size=1, grad_accum=8))
    for ra, rb in zip(one.history, many.history, strict=True):
        for key in ("loss", "token_accuracy", "perplexity", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "out" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "final" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)

    from prefalign.train.window import epoch_order

    features, _ = load_instructions(rows, tokenizer)
    first = [features[i] for i in epoch_order(len(features), seed=7, epoch=0)[:8]]
    lengths = [len(f["completion_input_ids"]) for f in first]
    assert len(set(lengths)) > 2
    out = LogpsModel(load_causal_lm(str(tiny_model_dir)))(*collate_instructions(
        first, tokenizer.pad_token_id).inputs())
    token_mean = -out.token_logps.sum() / out.mask.sum()
    row_mean = (-out.logps / out.lengths).mean()
    assert one.history[0]["loss"] == pytest.approx(token_mean.item(), abs=1e-5)
    assert abs(token_mean - row_mean).item() > 1e-3


def test_sft_memorises_completions_and_greedy_generation_reproduces_them(tmp_path,
                                                                         tiny_model_dir):
    rows = [{"prompt": "Capital of France?", "completion": " Paris."},
            {"prompt": "Two plus two?", "completion": " Four, of course."},
            {"prompt": "Colour of the sea?", "completion": " Deep blue."},
            {"prompt": "Best film?", "completion": " The one with the clever script."}]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    result = run_sft(sft_config(tmp_path, tiny_model_dir, data, lora_r=0, max_steps=30,
                                learning_rate=3e-3))
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < 0.5 < 6.0 < first["loss"]  # from about ln(vocabulary) = 6.2
    assert last["token_accuracy"] == 1.0 and first["token_accuracy"] < 0.1
    final = tmp_path / "out" / "final"
    model, tok = load_causal_lm(str(final)), load_tokenizer(str(final))
    for row in rows:
        inputs = tok(row["prompt"], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False,
                             eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, inputs["input_ids"].shape[1]:])
        assert text == row["completion"] + tok.eos_token


def test_cli_lora_artifacts_and_full_finetuning(tmp_path, tiny_model_dir, tokenizer):
    """LoRA through the CLI: adapter + merged model that score alike, metrics with perplexity
    and evaluation. Full fine-tuning on every token: an HF model directory."""
    from prefalign.cli import main

    data = write_jsonl(tmp_path / "sft.jsonl", instruction_rows(8))
    evals = write_jsonl(tmp_path / "eval.jsonl", instruction_rows(3, seed=9))
    out = tmp_path / "lora"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", data, "--eval-data", evals,
                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--grad-accum", "1", "--lora-r", "4", "--logging-steps", "1",
                 "--learning-rate", "1e-2", "--eval-steps", "2", "--seed", "7", "--merge"]) == 0
    assert (out / "final" / ADAPTER_CONFIG).is_file() and (out / "config.yaml").is_file()
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "token_accuracy", "perplexity", "grad_norm", "lr", "eval/loss",
                "eval/token_accuracy", "eval/perplexity"):
        assert key in records[-1], key
    assert records[-1]["perplexity"] == pytest.approx(math.exp(records[-1]["loss"]))
    assert records[-1]["eval/perplexity"] == pytest.approx(math.exp(records[-1]["eval/loss"]))

    features, _ = load_instructions(instruction_rows(3), tokenizer)
    inputs = collate_instructions(features, tokenizer.pad_token_id).inputs()
    merged = LogpsModel(load_causal_lm(str(out / "final-merged")))(*inputs).logps
    # eval(): the LoRA layers load_adapter inserts start in training mode (dropout 0.05 here).
    unmerged = load_adapter(load_causal_lm(str(tiny_model_dir)), out / "final",
                            trainable=False).eval()
    torch.testing.assert_close(merged, LogpsModel(unmerged)(*inputs).logps, atol=1e-4, rtol=0)
    base = LogpsModel(load_causal_lm(str(tiny_model_dir)))(*inputs).logps
    assert (merged - base).abs().max() > 1e-3  # the adapter is not a no-op

    full = run_sft(sft_config(tmp_path / "full", tiny_model_dir, data, lora_r=0, max_steps=1,
                              completion_only_loss=False))
    final = tmp_path / "full" / "out" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer_config.json").is_file()
    assert "completion_only_loss: false" in (tmp_path / "full" / "out" / "config.yaml").read_text()
    # The same first batch of the same starting model (seed 7), scored on every token.
    assert full.history[0]["loss"] != pytest.approx(records[0]["loss"], abs=1e-3)


def test_sft_adapter_is_the_start_and_reference_of_dpo(tmp_path, tiny_model_dir, tokenizer):
    """DPO --model OUTPUT/final of a LoRA SFT run: the adapter is merged into its base, DPO's
    reference (its fresh adapters disabled) scores exactly like the SFT model, and the first
    DPO loss is log 2 because policy and reference start equal."""
    data = write_jsonl(tmp_path / "sft.jsonl", instruction_rows(8))
    run_sft(sft_config(tmp_path / "sft", tiny_model_dir, data, max_steps=3, learning_rate=1e-2))
    sft_final = tmp_path / "sft" / "out" / "final"

    pairs, _ = load_preferences(preference_rows(4, seed=2), tokenizer)
    batch = collate_preferences(pairs, tokenizer.pad_token_id)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    sft_model = load_adapter(load_causal_lm(str(tiny_model_dir)), sft_final, trainable=False)
    sft_logps = LogpsModel(sft_model)(*inputs).logps
    base_logps = LogpsModel(load_causal_lm(str(tiny_model_dir)))(*inputs).logps
    assert (sft_logps - base_logps).abs().max() > 1e-2  # SFT moved the model

    dpo_config = DPOConfig(model=str(sft_final), data="d", lora_r=4, lora_dropout=0.0)
    start = prepare_for_training(load_causal_lm(str(sft_final)), dpo_config)
    reference = AdaptersOff()(LogpsModel(start), *inputs)
    torch.testing.assert_close(reference, sft_logps, atol=1e-4, rtol=0)

    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    result = run_dpo(DPOConfig(model=str(sft_final), data=prefs, output_dir=str(tmp_path / "dpo"),
                               batch_size=4, grad_accum=1, max_steps=1, learning_rate=1e-2,
                               lora_r=4, lora_dropout=0.0, logging_steps=1, warmup_ratio=0.0))
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    dpo_adapter = json.loads((tmp_path / "dpo" / "final" / ADAPTER_CONFIG).read_text())
    # One adapter over the true base holding both stages (ranks 4 + 4), not one naming
    # the SFT adapter as its base (PEFT would load that as base + DPO only).
    assert dpo_adapter["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert dpo_adapter["r"] == 8
    chained = LogpsModel(load_causal_lm(str(tmp_path / "dpo" / "final")))(*inputs).logps
    assert (chained - sft_logps).abs().max() > 1e-4  # base -> SFT -> DPO loads as one model
