"""Config sections: each command's config is composed of the sections it uses (model, data,
eval, optim, run, sampling, its own), shown as groups in --help and accepted as YAML
mappings as well as flat keys; an option of another command is refused naming the
command; configs are frozen; every flag a trainer had is still there (but the deliberate
removals below)."""

import argparse
import dataclasses
import re
from dataclasses import dataclass

import pytest
import yaml

from helpers import run_cli
from prefalign import cli
from prefalign.algorithms.dpo import DPOConfig
from prefalign.algorithms.iterate import IterateConfig
from prefalign.algorithms.kto import KTOConfig
from prefalign.algorithms.ppo import PPOConfig
from prefalign.algorithms.reward import RewardConfig
from prefalign.algorithms.sft import SFTConfig
from prefalign.config import (
    Section,
    add_config_arguments,
    build_config,
    config_from_args,
    config_to_dict,
    option,
    save_config,
    sections,
)
from prefalign.errors import ConfigError

CONFIGS = {"sft": SFTConfig, "dpo": DPOConfig, "kto": KTOConfig, "reward": RewardConfig,
           "ppo": PPOConfig, "iterate": IterateConfig}

# Every trainer's flags before the configs were split into sections.
SHARED = {
    "--allow-download", "--batch-size", "--chat-template", "--columns", "--data", "--epochs",
    "--eval-data", "--eval-split", "--eval-steps", "--grad-accum", "--gradient-checkpointing",
    "--group-by-length", "--learning-rate", "--load-in-4bit", "--load-in-8bit",
    "--logging-steps", "--logps-chunk-size", "--lora-alpha", "--lora-dropout", "--lora-r",
    "--lora-targets", "--lr-scheduler", "--max-drop-fraction", "--max-grad-norm",
    "--max-length", "--max-prompt-length", "--max-skipped-in-a-row", "--max-steps", "--merge",
    "--mixed-precision", "--model", "--on-nonfinite", "--output-dir", "--overwrite",
    "--report-to", "--resume", "--resume-from", "--save-steps", "--save-total-limit", "--seed",
    "--split", "--strict", "--text-as-chat", "--trust-remote-code", "--warmup-ratio",
    "--weight-decay"}
DPO_OWN = {"--beta", "--beta-per-source", "--disable-dropout", "--label-smoothing",
           "--loss-type", "--lr", "--nll-tokens", "--precompute-ref", "--prefix-sharing",
           "--ref-model", "--rpo-alpha", "--simpo-gamma"}
HEAD_FLAGS = {
    "sft": SHARED | {"--completion-only-loss", "--packing"},
    "dpo": SHARED | DPO_OWN,
    "kto": SHARED | {"--beta", "--desirable-weight", "--disable-dropout", "--lr", "--ref-model",
                     "--undesirable-weight"},
    "reward": SHARED | {"--center-rewards-coefficient", "--disable-dropout", "--lr",
                        "--prefix-sharing"},
    "ppo": SHARED | {
        "--cliprange", "--cliprange-value", "--disable-dropout", "--gamma", "--kl-coef",
        "--kl-estimator", "--kl-horizon", "--lam", "--lr", "--max-new-tokens",
        "--missing-eos-penalty", "--num-mini-batches", "--num-samples", "--ppo-epochs",
        "--reward-clip", "--reward-fn", "--reward-model", "--stop-strings",
        "--target-approx-kl", "--target-kl", "--temperature", "--top-p", "--value-model",
        "--vf-coef", "--whiten-rewards"},
    "iterate": SHARED | DPO_OWN | {
        "--evaluate-final", "--generation-batch-size", "--max-new-tokens", "--min-gap",
        "--num-candidates", "--pairing", "--prompts-per-round", "--rounds", "--scorer",
        "--temperature", "--top-p"},
}
# Options a command took and never used (PPO reads no eval set and truncates nothing;
# reward always saves a merged model) or refused (iterate's reference is each round's start).
REMOVED = {
    "reward": {"--merge"},
    "ppo": {"--eval-data", "--eval-split", "--eval-steps", "--group-by-length",
            "--max-drop-fraction", "--max-length", "--max-prompt-length", "--strict"},
    "iterate": {"--ref-model"},
}
# New: sft's --lr (its redeclared learning rate had lost the alias); the sampling section's
# --top-k (ppo, iterate) and --stop-strings (iterate), which their sampling passes on;
# ppo's --reward-weights (one weight per --reward-fn term) and --generation-engine (what
# samples the rollouts).
ADDED = {"sft": {"--lr"}, "ppo": {"--top-k", "--reward-weights", "--generation-engine"},
         "iterate": {"--top-k", "--stop-strings"}}


def run(capsys, argv):
    """prefalign ARGV in this process -> (exit code, stderr)."""
    code, _, err = run_cli(capsys, argv)
    return code, err


def trainer_parsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in CONFIGS}


def offered_flags(parser):
    return {s for a in parser._actions if a.help is not argparse.SUPPRESS
            for s in a.option_strings if s.startswith("--") and not s.startswith("--no-")}


# -- flags ----------------------------------------------------------------------------------


def test_every_earlier_flag_still_parses_but_the_deliberate_removals():
    parsers = trainer_parsers()
    for name, parser in parsers.items():
        expected = (HEAD_FLAGS[name] - REMOVED.get(name, set())) | ADDED.get(name, set())
        own = offered_flags(parser) - {"--config", "--debug", "--help"}
        assert own == expected, (name, own ^ expected)
        for flag in sorted(own):
            action = parser._option_string_actions[flag]
            value = "a=1" if action.metavar == "K=V,..." else "1"
            argv = [flag] if action.nargs == 0 else [flag, value]
            args, extra = parser.parse_known_args(argv)
            assert not extra and hasattr(args, action.dest), (name, flag)


@pytest.mark.parametrize("argv, flag, command", [
    (["ppo", "--model", "m", "--eval-data", "e.jsonl"], "--eval-data", "ppo"),
    (["ppo", "--max-length", "64"], "--max-length", "ppo"),
    (["reward", "--model", "m", "--merge"], "--merge", "reward"),
    (["reward", "--no-merge"], "--no-merge", "reward"),
    (["iterate", "--ref-model", "r"], "--ref-model", "iterate"),
])
def test_an_option_of_another_command_is_refused_naming_the_command(capsys, monkeypatch,
                                                                    argv, flag, command):
    monkeypatch.setattr(cli, "_run_command", lambda args: pytest.fail("the command ran"))
    code, err = run(capsys, argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert f"prefalign {command}: error: {flag} is not an option of {command}" in err
    assert "Traceback" not in err


def test_a_misspelt_flag_is_never_pointed_at_an_option_the_command_refuses(capsys):
    """`ppo --eval-dat` must not suggest --eval-data, which ppo would then refuse."""
    code, err = run(capsys, ["ppo", "--model", "m", "--eval-dat", "e.jsonl"])
    assert code == 2, err
    assert "unrecognized arguments: --eval-dat" in err
    assert "--eval-data" not in err


def test_help_shows_the_sections_in_order():
    expected = {
        "sft": ["model", "data", "eval", "optim", "run", "sft"],
        "dpo": ["model", "data", "eval", "optim", "run", "reference", "dpo"],
        "kto": ["model", "data", "eval", "optim", "run", "reference", "kto"],
        "reward": ["model", "data", "eval", "optim", "run", "reward"],
        "ppo": ["model", "data", "optim", "run", "rewards", "sampling", "ppo"],
        "iterate": ["model", "data", "eval", "optim", "run", "sampling", "dpo", "iterate"],
    }
    for name, parser in trainer_parsers().items():
        assert list(sections(CONFIGS[name])) == expected[name], name
        lines = parser.format_help().splitlines()
        titles = [line[:-1] for line in lines if line.endswith(":") and line[:1].isalpha()
                  and line[:-1] in expected[name]]
        assert titles == expected[name], (name, titles)
        text = parser.format_help()
        optim = text[text.index("\noptim:\n"):text.index("\nrun:\n")]
        assert "--learning-rate" in optim and "--batch-size" in optim and "--seed" not in optim


def test_sampling_defaults_stay_per_command():
    ppo = build_config(PPOConfig, {"model": "m", "data": "d", "reward_fn": "x"})
    assert (ppo.max_new_tokens, ppo.temperature, ppo.top_p, ppo.top_k) == (64, 0.7, 1.0, None)
    it = build_config(IterateConfig, {"model": "m", "data": "d", "scorer": "s"})
    assert (it.max_new_tokens, it.temperature, it.top_p, it.top_k) == (128, 1.0, 1.0, None)
    with pytest.raises(ConfigError, match="'temperature' must be > 0: greedy samples"):
        build_config(IterateConfig, {"model": "m", "data": "d", "scorer": "s",
                                     "temperature": 0})
    sft = build_config(SFTConfig, {"model": "m", "data": "d"})
    assert (sft.lr, build_config(SFTConfig, {"model": "m", "lora_r": 0}).lr) == (2e-4, 2e-5)
    assert build_config(SFTConfig, {"model": "m", "learning_rate": 0.5}).lr == 0.5
    with pytest.raises(ConfigError, match="'temperature' must be > 0 \\(PPO needs sampling\\)"):
        build_config(PPOConfig, {"model": "m", "temperature": 0})
    with pytest.raises(ConfigError, match="'top_p' must be in \\(0, 1\\]"):
        build_config(PPOConfig, {"model": "m", "top_p": 2})


# -- YAML -----------------------------------------------------------------------------------

NESTED = """\
model: {model: m, lora_r: 4}
data: {data: d.jsonl, max_length: 128, max_prompt_length: 64}
optim: {learning_rate: 1.0e-4, batch_size: 2}
run: {seed: 3, output_dir: o}
dpo: {beta: 0.2, loss_type: ipo}
reference: {ref_model: r}
"""
FLAT = """\
model: m
lora_r: 4
data: d.jsonl
max_length: 128
max_prompt_length: 64
learning_rate: 1.0e-4
batch_size: 2
seed: 3
output_dir: o
beta: 0.2
loss_type: ipo
ref_model: r
"""


def from_yaml(cls, text, tmp_path, *flags):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(["--config", str(path), *flags]))


def test_nested_yaml_equals_flat_yaml(tmp_path):
    nested = from_yaml(DPOConfig, NESTED, tmp_path)
    assert nested == from_yaml(DPOConfig, FLAT, tmp_path)
    assert (nested.learning_rate, nested.beta, nested.ref_model, nested.lora_r) == \
        (1e-4, 0.2, "r", 4)
    # Flags override a nested value as they override a flat one.
    assert from_yaml(DPOConfig, NESTED, tmp_path, "--lr", "3e-4").learning_rate == 3e-4
    mixed = "model: m\noptim: {epochs: 2}\nbeta: 0.3\n"
    assert (from_yaml(DPOConfig, mixed, tmp_path).epochs,
            from_yaml(DPOConfig, mixed, tmp_path).beta) == (2, 0.3)


@pytest.mark.parametrize("text, words", [
    ("model: m\noptim: {learning_rte: 1.0e-4}\n",
     ["unknown key 'optim.learning_rte'", "did you mean 'learning_rate'?"]),
    ("model: m\noptm: {learning_rate: 1.0e-4}\n", ["unknown key 'optm'", "did you mean 'optim'?"]),
    ("model: {model: m, learning_rate: 1.0e-4}\n",
     ["'learning_rate' is an option of section 'optim', not of section 'model'"]),
    ("model: m\nlearning_rate: 1.0e-4\noptim: {learning_rate: 2.0e-4}\n",
     ["'learning_rate' is given twice"]),
    ("model: m\noptim: 0.1\n", ["'optim' is a section: give it a mapping of its options"]),
    ("model: m\nlr: 1.0e-4\n", ["unknown key 'lr'", "did you mean 'learning_rate'?"]),
])
def test_bad_section_keys_are_named(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        from_yaml(DPOConfig, text, tmp_path)
    message = str(error.value)
    assert message.startswith(str(tmp_path / "c.yaml")) and "\n" not in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("cls, values, command, key", [
    (PPOConfig, {"eval_data": "e.jsonl"}, "ppo", "eval_data"),
    (PPOConfig, {"data": {"max_prompt_length": 8}}, "ppo", "max_prompt_length"),
    (RewardConfig, {"run": {"merge": True}}, "reward", "merge"),
    (IterateConfig, {"ref_model": "r"}, "iterate", "ref_model"),
    (SFTConfig, {"beta": 0.1}, "sft", "beta"),
])
def test_a_yaml_key_of_another_command_is_refused_naming_the_command(cls, values, command,
                                                                     key):
    with pytest.raises(ConfigError, match=f"'{key}' is not an option of {command}"):
        build_config(cls, {"model": "m", **values}, "c.yaml")


def test_a_section_the_command_lacks_is_named():
    with pytest.raises(ConfigError, match="'eval' is not a section of ppo"):
        build_config(PPOConfig, {"model": "m", "eval": "x"})


def test_saved_config_stays_flat(tmp_path):
    config = build_config(DPOConfig, yaml.safe_load(NESTED))
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == config_to_dict(config)
    assert all(not isinstance(v, dict) or k in ("columns", "beta_per_source")
               for k, v in saved.items())
    assert list(saved)[:2] == ["model", "trust_remote_code"]  # sections in --help's order
    assert build_config(DPOConfig, saved) == config


# -- frozen, checks per section ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_are_frozen(name):
    config = build_config(CONFIGS[name], {"model": "m", "data": "d", "scorer": "s"}
                          if name == "iterate" else {"model": "m"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    assert dataclasses.replace(config, seed=1).seed == 1 and config.seed != 1


@pytest.mark.parametrize("cls, key, value, message", [
    (PPOConfig, "lora_dropout", 1.0, "'lora_dropout' must be in [0, 1)"),     # model
    (PPOConfig, "max_grad_norm", -1.0, "'max_grad_norm' must be >= 0"),       # optim
    (PPOConfig, "save_total_limit", 0, "'save_total_limit' must be >= 1"),   # run
    (PPOConfig, "top_k", 0, "'top_k' must be none or >= 1"),                 # sampling
    (PPOConfig, "gamma", 0.0, "'gamma' must be in (0, 1]"),                  # ppo
    (IterateConfig, "max_drop_fraction", 2.0, "'max_drop_fraction' must be in [0, 1]"),
    (IterateConfig, "eval_steps", -1, "'eval_steps' must be >= 0"),
    (IterateConfig, "max_new_tokens", 0, "'max_new_tokens' must be >= 1"),
    (IterateConfig, "beta", 0.0, "'beta' must be > 0"),
    (IterateConfig, "min_gap", -1.0, "'min_gap' must be >= 0"),
    (RewardConfig, "center_rewards_coefficient", -1.0, "must be >= 0"),
    (KTOConfig, "desirable_weight", 0.0, "'desirable_weight' must be > 0"),
    (DPOConfig, "load_in_4bit", True, "'lora_r' must be > 0 with quantized"),
])
def test_each_sections_checks_run_in_the_composed_config(cls, key, value, message):
    base = {"model": "m", "data": "d", "lora_r": 0 if key == "load_in_4bit" else 16,
            **({"scorer": "s"} if cls is IterateConfig else {})}
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(cls, {**base, key: value})


# -- positional arguments ------------------------------------------------------------------


@dataclass(frozen=True)
class FilesOptions(Section):
    SECTION = "files"

    files: list[str] = option([], "files to read", positional=True, nargs="+", metavar="FILE")
    limit: int = option(3, "rows per file")


def test_positional_options_take_values_without_a_flag(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    add_config_arguments(parser, FilesOptions)
    config = config_from_args(FilesOptions, parser.parse_args(["a.jsonl", "b.jsonl",
                                                               "--limit", "5"]))
    assert config == FilesOptions(files=["a.jsonl", "b.jsonl"], limit=5)
    assert "FILE [FILE ...]" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--limit", "5"])  # one FILE at least
    assert "the following arguments are required: FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a flag's value is converted (and refused) while parsing
        parser.parse_args(["a.jsonl", "--limit", "many"])
    assert ("argument --limit: invalid int value: 'many' (config key 'limit': expected an "
            "integer" in capsys.readouterr().err)
