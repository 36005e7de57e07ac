"""Data that is not in prefalign's own fields: hub schemas, --columns, a system column,
--split, and the stop on mass drops (data.schemas, data check and the trainers)."""

import json
from pathlib import Path

import pytest

from helpers import gpt2_tokenizer
from prefalign.cli import main
from prefalign.config import build_config
from prefalign.data import load_preferences
from prefalign.data.formats import normalize_rows
from prefalign.data.instructions import load_instructions, normalize_instructions
from prefalign.data.prompts import load_prompts
from prefalign.data.schemas import adapt_rows
from prefalign.data.sources import load_rows
from prefalign.data.unpaired import load_unpaired
from prefalign.errors import ConfigError, DataError

HUB = Path(__file__).parent / "data" / "hub"
ORCA = HUB / "orca_dpo_pairs.jsonl"
ORCA_SYSTEM = ("You are an AI assistant. User will you give you a task. Your goal is to complete "
               "the task as faithfully as you can. While performing the task think step-by-step "
               "and justify your steps.")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fixture_rows(name):
    return [json.loads(line) for line in (HUB / name).read_text("utf-8").splitlines()]


def normalise(path, kind):
    rows, schema, _ = adapt_rows(load_rows(path), kind)
    if kind == "sft":
        return normalize_instructions(rows)[0], schema
    return normalize_rows(rows)[0], schema


def orca_rows(n):
    """n orca_dpo_pairs-shaped rows whose chosen and rejected share no first word, as in the
    real data set (where only such rows survived the implicit-prompt split by chance)."""
    starts = [("Certainly.", "No."), ("Yes,", "Maybe"), ("The answer:", "The result:")]
    return [{"system": ORCA_SYSTEM if i % 3 else "", "question": f"Question {i}: what is {i} + 1?",
             "chosen": f"{starts[i % 3][0]} {i} + 1 = {i + 1}.",
             "rejected": f"{starts[i % 3][1]} {i + 2}."} for i in range(n)]


# -- hub schemas ------------------------------------------------------------------------


def test_orca_rows_use_system_and_question():
    examples, schema = normalise(ORCA, "preference")
    raw = fixture_rows("orca_dpo_pairs.jsonl")
    assert schema == "orca_dpo_pairs"
    assert len(examples) == len(raw) == 6
    for example, row in zip(examples, raw):
        # A non-empty system goes in front of the question, separated by a blank line.
        expected = row["system"] + "\n\n" + row["question"] if row["system"] else row["question"]
        assert example["prompt"] == expected
        assert (example["chosen"], example["rejected"]) == (row["chosen"], row["rejected"])
        assert example["format"] == "explicit"
    assert examples[0]["prompt"].startswith(ORCA_SYSTEM + "\n\nGenerate a sentence")


def test_ultrafeedback_binarized_reads_the_conversations():
    examples, schema = normalise(HUB / "ultrafeedback_binarized.jsonl", "preference")
    raw = fixture_rows("ultrafeedback_binarized.jsonl")
    assert schema == "UltraFeedback-binarized"
    assert [e["prompt"] for e in examples] == [[{"role": "user", "content": r["prompt"]}]
                                               for r in raw]
    assert examples[1]["chosen"] == [{"role": "assistant", "content": "A spider has eight legs."}]
    assert examples[1]["rejected"][0]["content"] == "Spiders have six legs, like insects."
    assert [e["id"] for e in examples] == [r["prompt_id"] for r in raw]
    sft, schema = normalise(HUB / "ultrafeedback_binarized.jsonl", "sft")
    assert schema == "UltraFeedback-binarized"
    assert [e["messages"] for e in sft] == [r["messages"] for r in raw]


def test_hh_rlhf_is_recognised_and_read_as_before():
    examples, schema = normalise(HUB / "hh_rlhf.jsonl", "preference")
    assert schema == "HH-RLHF"
    assert examples[1]["prompt"] == ("\n\nHuman: How do I boil an egg?\n\nAssistant: Put the egg "
                                     "in boiling water.\n\nHuman: For how long?\n\nAssistant:")
    assert examples[1]["chosen"] == " About nine minutes for a hard-boiled egg."
    assert examples[1]["rejected"] == " An hour."
    assert {e["format"] for e in examples} == {"hh"}


def test_alpaca_prompt_is_instruction_then_input():
    examples, schema = normalise(HUB / "alpaca.jsonl", "sft")
    assert schema == "Alpaca"
    # The `text` column (the whole formatted example) is not trained on.
    assert {e["format"] for e in examples} == {"prompt-completion"}
    assert [(e["prompt"], e["completion"]) for e in examples] == [
        ("Give three tips for staying healthy.",  # empty input: the instruction alone
         "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."),
        ("Identify the odd one out.\n\nTwitter, Instagram, Telegram",
         "Telegram is the odd one out: it is a messaging app, the others are social networks."),
        ("Rewrite the sentence in the passive voice.\n\nThe chef cooked the meal.",
         "The meal was cooked by the chef."),
        ("Name a primary colour.", "Red."),  # a blank input counts as empty
    ]


def test_sharegpt_turns_become_messages():
    examples, schema = normalise(HUB / "sharegpt.jsonl", "sft")
    assert schema == "ShareGPT"
    assert examples[0]["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]
    assert [m["role"] for m in examples[1]["messages"]] == [
        "system", "user", "assistant", "user", "assistant"]
    assert examples[1]["messages"][0]["content"] == "You are a pirate. Answer like one."
    assert [m["role"] for m in examples[2]["messages"]] == ["user", "assistant"]
    assert [e["id"] for e in examples] == ["QWJhYvA_0", "i6IyJda_1", "x8Kq2Lm_0"]


def test_sharegpt_unknown_speaker_names_row_and_valid_values(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}])
    with pytest.raises(DataError, match=r"s\.jsonl:1: field 'conversations' turn 1 has from "
                       r"'bot'; use one of human, user, gpt, assistant, system"):
        normalise(path, "sft")


def test_prompt_sets_read_hub_schemas():
    prompts = load_prompts(ORCA)
    assert prompts[0]["prompt"].startswith(ORCA_SYSTEM + "\n\nGenerate")
    prompts = load_prompts(HUB / "sharegpt.jsonl")
    assert [m["role"] for m in prompts[1]["prompt"]] == ["system", "user", "assistant", "user"]
    assert load_prompts(HUB / "alpaca.jsonl")[1]["prompt"] == (
        "Identify the odd one out.\n\nTwitter, Instagram, Telegram")


# -- system column ----------------------------------------------------------------------


def test_system_column_is_a_first_message_for_conversational_rows():
    user = [{"role": "user", "content": "Hi"}]
    rows = [
        {"prompt": user, "system": "Be brief.", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": "Hi", "system": "Be brief.", "chosen": [{"role": "assistant", "content": "A"}],
         "rejected": [{"role": "assistant", "content": "B"}]},
        {"prompt": "Hi", "system": "Be brief.", "chosen": " A", "rejected": " B"},
        {"prompt": "Hi", "system": "  ", "chosen": " A", "rejected": " B"},
    ]
    examples, _ = load_and_normalise(rows)
    system = {"role": "system", "content": "Be brief."}
    assert examples[0]["prompt"] == [system, *user]
    assert examples[1]["prompt"] == [system, *user]
    assert examples[2]["prompt"] == "Be brief.\n\nHi"
    assert examples[3]["prompt"] == "Hi"  # a blank system is no system


def test_system_column_and_system_turn_together_are_refused():
    rows = [{"prompt": [{"role": "system", "content": "A"}, {"role": "user", "content": "Hi"}],
             "system": "B", "chosen": "x", "rejected": "y"}]
    with pytest.raises(DataError, match=r"<list> row 0: field 'prompt' starts with a system "
                       "message and the row also has a 'system' column"):
        load_and_normalise(rows)


def load_and_normalise(rows, columns=None):
    adapted, _, _ = adapt_rows(load_rows(rows), "preference", columns)
    return normalize_rows(adapted)


# -- column mapping ---------------------------------------------------------------------


def test_columns_map_fields_for_every_loader(tmp_path, tokenizer):
    rows = [{"sys": "Be kind.", "q": f"Q{i}?", "good": f" yes {i}", "bad": f" no {i}"}
            for i in range(4)]
    path = write_jsonl(tmp_path / "own.jsonl", rows)
    columns = "prompt=q,system=sys,chosen=good,rejected=bad"
    features, report = load_preferences(path, tokenizer, columns=columns, max_drop_fraction=0.05)
    assert report.normalize.kept == 4
    want = tokenizer("Be kind.\n\nQ0?", add_special_tokens=False)["input_ids"]
    assert features[0]["prompt_input_ids"][-len(want):] == want
    _, report = load_unpaired(path, tokenizer, columns={"prompt": "q", "chosen": "good",
                                                        "rejected": "bad"})
    assert report.examples == 8
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"ask": "Q?", "say": " A."}])
    _, report = load_instructions(sft, tokenizer, columns="prompt=ask,completion=say")
    assert report.normalize.formats == {"prompt-completion": 1}
    assert load_prompts(path, columns="prompt=q")[0]["prompt"] == "Q0?"


def test_columns_unknown_target_and_missing_source(tmp_path, capsys):
    path = write_jsonl(tmp_path / "own.jsonl", orca_rows(3))
    assert main(["data", "check", str(path), "--columns", "promt=question"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("prefalign: error: config key 'columns': unknown target 'promt' (did you "
                   "mean 'prompt'?); the valid targets are prompt, system, chosen, rejected, "
                   "completion, label, messages, text, margin, weight, source, id")
    assert main(["data", "check", str(path), "--columns", "prompt=questoin"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"prefalign: error: {path}:1: --columns maps prompt=questoin, but the row has "
                   "no column 'questoin' (it has 'system', 'question', 'chosen', 'rejected'); "
                   "fix the mapping")
    with pytest.raises(ConfigError, match="unknown target 'completion'.*valid targets are "
                       "prompt, system, chosen, rejected, margin, weight, source, id"):
        load_preferences(path, None, columns="completion=chosen")


def test_columns_in_yaml_as_mapping_or_string():
    from prefalign.algorithms.dpo import DPOConfig

    as_map = build_config(DPOConfig, {"model": "m", "columns": {"prompt": "question"}})
    as_text = build_config(DPOConfig, {"model": "m", "columns": "prompt=question, system=sys"})
    assert as_map.columns == {"prompt": "question"}
    assert as_text.columns == {"prompt": "question", "system": "sys"}
    with pytest.raises(ConfigError, match="key 'prompt' is given twice"):
        build_config(DPOConfig, {"model": "m", "columns": "prompt=a,prompt=b"})


# -- data check and the trainers ---------------------------------------------------------


def test_data_check_keeps_all_orca_rows(tmp_path, capsys):
    path = write_jsonl(tmp_path / "orca.jsonl", orca_rows(42))
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"{path}: OK", "rows read: 42, kept: 42, dropped: 0"]
    assert f"data: recognised orca_dpo_pairs rows in {path}" in out


def test_mass_drop_stops_data_check_and_trainer(tmp_path, capsys, tiny_model_dir):
    # orca's fields under other names: no schema matches, so 3 of 4 rows have no prompt.
    rows = [{"sys": r["system"], "q": r["question"], "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in orca_rows(42)]
    path = write_jsonl(tmp_path / "renamed.jsonl", rows)
    line = (f"prefalign: error: {path}: 28 of 42 rows dropped (no shared prompt: 28), more "
            f"than max_drop_fraction 0.05; first: {path}:1; if the data has other column "
            "names, map them (--columns prompt=question,system=system), or raise "
            "--max-drop-fraction")
    assert main(["data", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == line
    assert f"{path}: NOT OK: 28 of 42 rows dropped" in captured.out
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(path),
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == line
    assert main(["data", "check", str(path), "--max-drop-fraction", "0.7"]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(path), "--columns", "prompt=q,system=sys"]) == 0
    assert "rows read: 42, kept: 42, dropped: 0" in capsys.readouterr().out


def test_dpo_trains_on_every_orca_row(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "dpo"
    code = main(["dpo", "--model", str(tiny_model_dir), "--data", str(ORCA), "--output-dir",
                 str(out), "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1",
                 "--lora-r", "4"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"data: recognised orca_dpo_pairs rows in {ORCA}" in lines
    assert any(line.startswith(f"data: {ORCA}: 6 rows, 6 kept (explicit 6)") for line in lines)


def test_data_check_shows_an_example_with_gpt2_bpe(tmp_path, capsys):
    tokenizer = gpt2_tokenizer()
    model_dir = tmp_path / "gpt2-tokenizer"
    tokenizer.save_pretrained(model_dir)
    assert main(["data", "check", str(ORCA), "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    first = fixture_rows("orca_dpo_pairs.jsonl")[0]
    prompt = first["system"] + "\n\n" + first["question"]
    assert (f"example ({ORCA}:1) as the model sees it, special tokens shown:\n"
            f"  prompt:     {prompt!r}\n"
            f"  chosen:     {first['chosen'] + '<|endoftext|>'!r}\n"
            f"  rejected:   {first['rejected'] + '<|endoftext|>'!r}") in out
    # The ids behind it are GPT-2's ("Hello world" is 15496, 995; <|endoftext|> is 50256),
    # and the prompt's are those of the system, a blank line ("\n" is 198) and the question.
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    features, _ = load_preferences(ORCA, tokenizer)
    assert features[0]["prompt_input_ids"] == tokenizer(prompt)["input_ids"]
    n_system = len(tokenizer(first["system"])["input_ids"])
    assert features[0]["prompt_input_ids"][n_system : n_system + 2] == [198, 198]
    assert features[0]["chosen_input_ids"][-1] == 50256
    assert tokenizer.decode(features[0]["prompt_input_ids"]) == prompt

    assert main(["data", "check", str(HUB / "alpaca.jsonl"), "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "read as: Alpaca rows as instructions (sft)" in out
    assert ("  prompt:     'Give three tips for staying healthy.'\n"
            "  completion: '1. Eat a balanced diet.\\n2. Exercise regularly.\\n3. Get enough "
            "sleep.<|endoftext|>'") in out


def test_split_of_a_dataset_dict_folder(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rows = fixture_rows("ultrafeedback_binarized.jsonl")
    folder = tmp_path / "uf"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows[:2]),
                          "test_prefs": datasets.Dataset.from_list(rows[2:])}).save_to_disk(folder)
    capsys.readouterr()  # the progress bars of save_to_disk
    assert main(["data", "check", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"prefalign: error: {folder}: a DatasetDict without a 'train' split; choose one of "
        "test_prefs, train_prefs with --split")
    assert main(["data", "check", str(folder), "--split", "test_prefs"]) == 0
    out = capsys.readouterr().out
    assert "data: recognised UltraFeedback-binarized rows in" in out
    assert "rows read: 1, kept: 1, dropped: 0" in out
    assert main(["data", "check", str(ORCA), "--split", "train"]) == 2
    assert "--split train given, but a jsonl file has no splits" in capsys.readouterr().err
    assert len(load_rows(str(folder), split="train_prefs")) == 2


@pytest.mark.parametrize("command, data, extra, report", [
    ("sft", HUB / "alpaca.jsonl", [], "4 rows, 4 kept (prompt-completion 4)"),
    ("kto", ORCA, ["--columns", "prompt=question"],
     "6 paired rows, 6 kept (explicit 6) -> 12 examples"),
])
def test_sft_and_kto_read_hub_schemas_and_columns(command, data, extra, report, tmp_path, capsys,
                                                  tiny_model_dir):
    code = main([command, "--model", str(tiny_model_dir), "--data", str(data), "--output-dir",
                 str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2", "--grad-accum",
                 "1", "--lora-r", "4", *extra])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    if not extra:
        assert f"data: recognised Alpaca rows in {data}" in lines
    assert any(line.startswith(f"data: {data}: {report}") for line in lines), lines
