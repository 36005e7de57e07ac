"""Only a trained scalar head scores: a causal LM, a num_labels=2 classifier, a checkpoint
without head weights or an adapter on a causal LM is refused by every entry point that
loads a reward model (exit 2, one line), never scored with a randomly initialised head."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from helpers import preference_rows, write_jsonl
from prefalign.cli import main
from prefalign.errors import PrefalignError
from prefalign.lora import apply_lora, lora_layers, save_adapter
from prefalign.models import (
    RewardModel,
    check_reward_model,
    init_reward_model,
    load_reward_model,
)
from prefalign.tiny import build_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer, tiny_model_dir):
    root = tmp_path_factory.mktemp("rm-checks")
    rm = RewardModel.from_causal_lm(build_model(tokenizer, seed=2), tokenizer.pad_token_id)
    rm.save_pretrained(root / "rm", tokenizer)

    config = build_model(tokenizer, seed=3).config
    config.num_labels = 2
    two = AutoModelForSequenceClassification.from_config(config)
    two.save_pretrained(root / "two_labels")
    tokenizer.save_pretrained(root / "two_labels")

    shutil.copytree(root / "rm", root / "no_head")
    weights = root / "no_head" / "model.safetensors"
    state = load_file(str(weights))
    del state["score.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})

    lm = build_model(tokenizer, seed=4)
    apply_lora(lm, r=4, alpha=8)
    save_adapter(lm, root / "adapter", base_model_name_or_path=str(tiny_model_dir))
    tokenizer.save_pretrained(root / "adapter")

    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": "The film"}, {"prompt": "Hi"}])
    data = write_jsonl(root / "pairs.jsonl", preference_rows(4))
    return {"rm": root / "rm", "lm": tiny_model_dir, "two": root / "two_labels",
            "no_head": root / "no_head", "adapter": root / "adapter", "root": root,
            "prompts": prompts, "data": data}


WRONG = {
    "lm": "is a causal language model (LlamaForCausalLM), not a reward model: train one with "
          "`prefalign reward` or pass a sequence-classification checkpoint with num_labels=1",
    "two": "is a sequence-classification checkpoint with num_labels=2 "
           "(LlamaForSequenceClassification)",
    "no_head": "LlamaForSequenceClassification checkpoint whose weight files hold no "
               "`score.weight`, so its head would be random",
    "adapter": "is a LoRA adapter on ",
}


@pytest.mark.parametrize("kind", sorted(WRONG))
def test_check_names_the_directory_and_what_it_is(dirs, kind):
    with pytest.raises(PrefalignError) as err:
        check_reward_model(dirs[kind])
    message = str(err.value)
    assert message.startswith(str(dirs[kind])) and WRONG[kind] in message, message
    assert "\n" not in message
    if kind == "adapter":
        assert f"{dirs['lm']}, which is a causal language model (LlamaForCausalLM)" in message
    with pytest.raises(PrefalignError):
        load_reward_model(dirs[kind])


def test_sharded_checkpoint_is_checked_through_its_index(dirs, tmp_path):
    """model.safetensors.index.json names the shard of every key: the head must be in it."""
    shard = tmp_path / "sharded"
    shutil.copytree(dirs["rm"], shard)
    state = load_file(str(shard / "model.safetensors"))
    (shard / "model.safetensors").rename(shard / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    assert check_reward_model(shard) == shard
    del index["weight_map"]["score.weight"]
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PrefalignError, match="hold no `score.weight`"):
        check_reward_model(shard)


def test_saved_reward_model_loads_with_its_head(dirs):
    saved = load_file(str(dirs["rm"] / "model.safetensors"))["score.weight"]
    model = load_reward_model(dirs["rm"])
    assert torch.equal(model.score.weight.detach(), saved)
    again = load_reward_model(dirs["rm"])
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, mask), again.eval()(ids, mask))


def test_adapter_on_a_reward_model_is_merged_into_it(dirs, tmp_path, tokenizer):
    base = load_reward_model(dirs["rm"])
    tuned = base.to_sequence_classification()
    apply_lora(tuned, r=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(tuned).values():
            layer.lora_B.weight.normal_(0, 0.1)
    save_adapter(tuned, tmp_path / "rm_adapter", base_model_name_or_path=str(dirs["rm"]))
    tokenizer.save_pretrained(tmp_path / "rm_adapter")
    ids = torch.tensor([tokenizer("Good great excellent")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = base.eval()(ids, mask)  # base's modules now hold the LoRA layers
        got = load_reward_model(tmp_path / "rm_adapter").eval()(ids, mask)
        plain = load_reward_model(dirs["rm"]).eval()(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_training_and_critics_still_start_from_a_causal_lm(dirs):
    """init_reward_model (reward training, PPO --value-model) gives a causal LM a fresh
    head on purpose; a classification dir that is not a reward model stays refused."""
    model = init_reward_model(dirs["lm"])
    assert model.score.weight.shape[0] == 1
    with pytest.raises(PrefalignError, match="num_labels=2"):
        init_reward_model(dirs["two"])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _argv(command, path, d, tmp_path):
    if command == "score":
        return ["score", "--reward-model", str(path), "--data", d["data"],
                "--output", str(tmp_path / "scored.jsonl")]
    if command == "evaluate":
        return ["evaluate", "--models", f"base={d['lm']}", "--prompts", d["prompts"],
                "--reward-model", str(path), "--output-dir", str(tmp_path / "report"),
                "--max-new-tokens", "2"]
    if command == "generate":
        return ["generate", "--model", str(d["lm"]), "--data", d["prompts"], "--scorer",
                str(path), "--output", str(tmp_path / "pairs.jsonl"), "--num-candidates", "2",
                "--max-new-tokens", "2"]
    if command == "iterate":
        return ["iterate", "--model", str(d["lm"]), "--data", d["prompts"], "--scorer",
                str(path), "--output-dir", str(tmp_path / "iterate")]
    return ["ppo", "--model", str(d["lm"]), "--data", d["prompts"], "--reward-model",
            str(path), "--output-dir", str(tmp_path / "ppo"), "--max-steps", "1",
            "--batch-size", "2", "--max-new-tokens", "2"]


@pytest.mark.parametrize("command", ["score", "evaluate", "generate", "iterate", "ppo"])
@pytest.mark.parametrize("kind", ["lm", "two", "no_head", "adapter"])
def test_every_entry_point_refuses_what_is_not_a_reward_model(dirs, tmp_path, capsys,
                                                              command, kind):
    assert main(_argv(command, dirs[kind], dirs, tmp_path)) == 2
    err = _one_error_line(capsys)
    assert str(dirs[kind]) in err and WRONG[kind] in err, err
    assert not (tmp_path / "scored.jsonl").exists() and not (tmp_path / "pairs.jsonl").exists()


def test_score_with_a_saved_reward_model_works(dirs, tmp_path):
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--reward-model", str(dirs["rm"]), "--data", dirs["data"],
                 "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["score_chosen"], float) for r in rows)
    # Scores are the saved head's, so a second run gives the same numbers.
    again = tmp_path / "again.jsonl"
    assert main(["score", "--reward-model", str(dirs["rm"]), "--data", dirs["data"],
                 "--output", str(again)]) == 0
    assert again.read_text() == out.read_text()


def test_generate_with_a_saved_reward_model_works(dirs, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert main(["generate", "--model", str(dirs["lm"]), "--data", dirs["prompts"],
                 "--scorer", str(dirs["rm"]), "--output", str(out), "--num-candidates", "2",
                 "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
