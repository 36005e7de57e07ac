"""Bad configs and mismatched model files: refused before training with exit code 2 and one
line naming the key (or directory) and what is valid; a tokenizer without a pad token
trains with EOS as padding."""

import json

import pytest

from helpers import preference_rows, write_jsonl
from helpers import run_cli as run
from prefalign.algorithms.dpo import DPOConfig
from prefalign.cli import main
from prefalign.config import build_config
from prefalign.errors import ConfigError, PrefalignError
from prefalign.models import check_vocabulary, load_tokenizer
from prefalign.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "p.jsonl", preference_rows(4))


def trainer_argv(command, model_dir, data, out_dir, *extra):
    return [command, "--model", str(model_dir), "--data", data, "--output-dir", str(out_dir),
            "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "2",
            "--max-length", "64", "--max-prompt-length", "32", *extra]


def assert_refused(code, err, *words, after_progress=False):
    """Exit 2 and one error line naming `words`; after_progress: the error came after
    loading the model, whose progress bars (transformers') may precede it on stderr."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    if after_progress:
        assert sum("error" in line for line in lines) == 1, err
        lines = lines[-1:]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


# -- unknown keys ------------------------------------------------------------------------


def test_unknown_yaml_key_is_named_with_the_closest_valid_one(tiny_model_dir, data, tmp_path,
                                                                capsys):
    config = tmp_path / "run.yaml"
    config.write_text("beta: 0.1\nlearning_rte: 1.0e-5\n")
    code, _, err = run(capsys, trainer_argv("dpo", tiny_model_dir, data, tmp_path / "out",
                                            "--config", str(config)))
    assert_refused(code, err, str(config), "unknown key 'learning_rte'",
                   "did you mean 'learning_rate'?", "--help")
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("command", ["dpo", "reward", "kto"])
def test_unknown_flag_is_named_with_the_closest_valid_one(command, tiny_model_dir, data,
                                                            tmp_path, capsys):
    code, _, err = run(capsys, trainer_argv(command, tiny_model_dir, data, tmp_path / "out",
                                            "--lerning-rate", "1e-4"))
    assert_refused(code, err, f"prefalign {command}: error: unrecognized arguments: "
                   "--lerning-rate 1e-4", "did you mean --learning-rate?",
                   f"`prefalign {command} --help`")


def test_other_argument_errors_are_one_line_too(capsys):
    code, _, err = run(capsys, ["data", "check", "p.jsonl", "--max-length", "many"])
    assert_refused(code, err, "prefalign data check: error: argument --max-length: invalid int "
                   "value: 'many'", "`prefalign data check --help`")


# -- wrong types -------------------------------------------------------------------------

WRONG_TYPES = [
    (["--beta", "abc"], None, "config key 'beta': expected a number (got 'abc')"),
    (["--beta", "nan"], None, "config key 'beta': expected a finite number"),
    (["--learning-rate", "inf"], None, "config key 'learning_rate': expected a finite number"),
    (["--batch-size", "2.5"], None, "config key 'batch_size': expected an integer (got '2.5')"),
    (["--max-length", "long"], None, "config key 'max_length': expected an integer"),
    ([], "beta: [0.1, 0.2]\n", "config key 'beta': expected a number (got [0.1, 0.2])"),
    ([], "epochs: 1.5\n", "config key 'epochs': expected an integer (got 1.5)"),
    ([], "resume: maybe\n", "config key 'resume': expected true or false (got 'maybe')"),
    ([], "lora_targets: 5\n", "config key 'lora_targets': expected a list (got 5)"),
    ([], "beta_per_source: helpful=x\n", "config key 'beta_per_source': expected a number"),
    ([], "- beta: 0.1\n", "expected a mapping of config keys at the top level"),
]


@pytest.mark.parametrize("flags, yaml_text, words", WRONG_TYPES,
                         ids=[w.split(":")[0] + "-" + str(i) for i, (_, _, w)
                              in enumerate(WRONG_TYPES)])
def test_wrong_types_are_refused_naming_key_and_type(flags, yaml_text, words, tiny_model_dir,
                                                     data, tmp_path, capsys):
    if yaml_text is not None:
        config = tmp_path / "run.yaml"
        config.write_text(yaml_text)
        flags = ["--config", str(config)]
    code, _, err = run(capsys, trainer_argv("dpo", tiny_model_dir, data, tmp_path / "out",
                                            *flags))
    assert_refused(code, err, words)


def test_whole_numbers_in_any_spelling_are_integers():
    config = build_config(DPOConfig, {"model": "m", "max_length": "1e3", "batch_size": 8.0,
                                      "max_prompt_length": " 512 "})
    assert (config.max_length, config.batch_size, config.max_prompt_length) == (1000, 8, 512)


# -- impossible values -------------------------------------------------------------------

IMPOSSIBLE = [
    ("dpo", ["--beta", "0"], "config key 'beta' must be > 0"),
    ("dpo", ["--beta", "-0.1"], "config key 'beta' must be > 0"),
    ("kto", ["--beta", "0"], "config key 'beta' must be > 0"),
    ("dpo", ["--learning-rate", "0"], "config key 'learning_rate' must be > 0"),
    ("reward", ["--learning-rate=-1e-5"], "config key 'learning_rate' must be > 0"),
    ("dpo", ["--max-length", "1"], "config key 'max_length' must be >= 2"),
    ("kto", ["--max-length", "0"], "config key 'max_length' must be >= 2"),
    ("dpo", ["--max-prompt-length", "64"], "config key 'max_prompt_length' must be in "
     "[1, max_length=64)"),
    ("dpo", ["--lora-r", "-1"], "config key 'lora_r' must be >= 0 (0 = full fine-tuning)"),
    ("reward", ["--lora-r", "-4"], "config key 'lora_r' must be >= 0 (0 = full fine-tuning)"),
    ("dpo", ["--lora-alpha", "0"], "config key 'lora_alpha' must be > 0"),
    ("dpo", ["--batch-size", "0"], "config key 'batch_size' must be >= 1"),
    ("kto", ["--batch-size", "1"], "config key 'batch_size' must be >= 2"),
    ("dpo", ["--loss-type", "nope"], "config key 'loss_type': 'nope' is not one of sigmoid"),
]


@pytest.mark.parametrize("command, flags, words", IMPOSSIBLE,
                         ids=[f"{c}{''.join(f)}" for c, f, _ in IMPOSSIBLE])
def test_impossible_values_are_refused_with_the_valid_range(command, flags, words,
                                                            tiny_model_dir, data, tmp_path,
                                                            capsys):
    code, _, err = run(capsys, trainer_argv(command, tiny_model_dir, data, tmp_path / "out",
                                            *flags))
    assert_refused(code, err, words)
    assert not (tmp_path / "out").exists()


def test_rank_zero_is_full_fine_tuning_not_an_error():
    config = build_config(DPOConfig, {"model": "m", "lora_r": 0})
    assert config.lora_r == 0 and config.lr == 5e-6  # the full fine-tuning default
    with pytest.raises(ConfigError, match=r"'lora_r' must be >= 0 \(0 = full fine-tuning\)"):
        build_config(DPOConfig, {"model": "m", "lora_r": -1})


def test_debug_shows_the_config_error_itself(tiny_model_dir, data, tmp_path):
    with pytest.raises(ConfigError, match="'beta' must be > 0"):
        main(["--debug", *trainer_argv("dpo", tiny_model_dir, data, tmp_path, "--beta", "0")])


# -- tokenizer and model files -----------------------------------------------------------


@pytest.fixture(scope="module")
def no_pad_model_dir(tmp_path_factory, tokenizer):
    """The tiny model with a tokenizer saved without a pad token (as GPT-2 and Llama ship)."""
    path = tmp_path_factory.mktemp("no-pad")
    build_model(tokenizer, arch="llama", seed=0).save_pretrained(path)
    tok = build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(path)
    assert json.loads((path / "tokenizer_config.json").read_text()).get("pad_token") is None
    return path


def test_a_tokenizer_without_pad_token_pads_with_eos(no_pad_model_dir):
    tok = load_tokenizer(str(no_pad_model_dir))
    assert tok.pad_token_id == tok.eos_token_id is not None


@pytest.mark.parametrize("command", ["dpo", "reward", "kto"])
def test_training_with_a_tokenizer_without_pad_token(command, no_pad_model_dir, data, tmp_path,
                                                      capsys):
    code, _, err = run(capsys, trainer_argv(command, no_pad_model_dir, data, tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "final").is_dir()


def test_a_tokenizer_without_pad_or_eos_token_is_refused(tmp_path, tokenizer, data, capsys):
    build_model(tokenizer, arch="llama", seed=0).save_pretrained(tmp_path / "m")
    tok = build_tokenizer()
    tok.pad_token = tok.eos_token = None
    tok.save_pretrained(tmp_path / "m")
    code, _, err = run(capsys, trainer_argv("dpo", tmp_path / "m", data, tmp_path / "out"))
    assert_refused(code, err, f"tokenizer of {tmp_path / 'm'} has neither a pad nor an EOS "
                   "token", "add a pad token")


@pytest.fixture(scope="module")
def mismatch_model_dir(tmp_path_factory, tokenizer):
    """A model with 300 embedding rows saved beside the 512-token tokenizer."""
    path = tmp_path_factory.mktemp("mismatch")
    small = build_tokenizer(vocab_size=300)
    model = build_model(small, arch="llama", seed=0)
    assert model.get_input_embeddings().num_embeddings == len(small) < len(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["dpo", "reward", "kto"])
def test_vocabulary_mismatch_is_reported_before_training(command, mismatch_model_dir, data,
                                                         tmp_path, capsys, tokenizer):
    code, _, err = run(capsys, trainer_argv(command, mismatch_model_dir, data, tmp_path / "out"))
    rows = len(build_tokenizer(vocab_size=300))
    assert_refused(code, err, f"{mismatch_model_dir}: the tokenizer has token ids up to "
                   f"{len(tokenizer) - 1} but the model embeds only {rows}",
                   "use the tokenizer the model was trained with",
                   f"resize_token_embeddings({len(tokenizer)})", after_progress=True)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_mismatched_reference_model_is_reported_too(mismatch_model_dir, tiny_model_dir, data,
                                                      tmp_path, capsys):
    code, _, err = run(capsys, trainer_argv("dpo", tiny_model_dir, data, tmp_path / "out",
                                            "--ref-model", str(mismatch_model_dir)))
    assert_refused(code, err, f"{mismatch_model_dir}: the tokenizer has token ids up to",
                   after_progress=True)


def test_a_larger_embedding_than_the_tokenizer_is_fine(tokenizer):
    """Real checkpoints often pad the embedding (e.g. to a multiple of 64): not a mismatch."""
    check_vocabulary(tokenizer, build_model(tokenizer, vocab_size=len(tokenizer) + 64), "m")
    with pytest.raises(PrefalignError, match="up to 511 but the model embeds only 300"):
        check_vocabulary(tokenizer, build_model(build_tokenizer(vocab_size=300)), "m")
