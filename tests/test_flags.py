"""Command-line flags: a prefix of a flag is refused (argparse abbreviations are off in
every parser), `--lr` is an explicit alias of `--learning-rate`, and `python -m prefalign`
runs the same command."""

import argparse
import subprocess
import sys

import pytest

from helpers import run_cli
from prefalign import cli
from prefalign.algorithms.dpo import DPOConfig
from prefalign.config import config_from_args


def run(capsys, argv):
    """prefalign ARGV in this process -> (exit code, stderr)."""
    code, _, err = run_cli(capsys, argv)
    return code, err


def leaf_parsers(parser, words=()):
    """(command words, parser) for every command that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield words, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaf_parsers(child, (*words, name))


def all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from all_parsers(child)


def test_lr_is_an_alias_of_learning_rate():
    parser = cli.build_parser()
    for flags in (["--lr", "1e-5"], ["--learning-rate", "1e-5"], ["--lr=1e-5"]):
        argv = ["dpo", "--model", "m", "--data", "d.jsonl", *flags]
        args, extra = parser.parse_known_args(argv)
        assert not extra
        config = config_from_args(DPOConfig, args)
        assert config.learning_rate == 1e-5, argv
        assert config.lr_scheduler == "cosine", argv  # not taken as --lr-scheduler
    help_text = parser._subparsers._group_actions[0].choices["dpo"].format_help()
    assert "--learning-rate LEARNING_RATE, --lr LEARNING_RATE" in help_text


@pytest.mark.parametrize("command, extra, meant", [
    (["dpo"], ["--lr-sch", "cosine"], "--lr-scheduler"),
    (["dpo"], ["--learn", "1e-5"], "--learning-rate"),
    (["sft"], ["--learn=1e-5"], "--learning-rate"),
    (["ppo"], ["--lr-sched", "linear"], "--lr-scheduler"),
    ([], ["--vers"], "--version"),
])
def test_a_prefix_is_refused_naming_the_full_flag(capsys, monkeypatch, command, extra, meant):
    monkeypatch.setattr(cli, "_run_command", lambda args: pytest.fail("the command ran"))
    code, err = run(capsys, [*command, *extra])
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert f"prefalign{''.join(' ' + c for c in command)}: error: unrecognized arguments: " \
        f"{' '.join(extra)} (did you mean {meant}?)" in err
    assert "Traceback" not in err


def test_every_parser_turns_abbreviations_off():
    parsers = list(all_parsers(cli.build_parser()))
    assert len(parsers) > 10
    assert all(p.allow_abbrev is False for p in parsers), [
        p.prog for p in parsers if p.allow_abbrev]


COMMANDS = {"dpo", "sft", "kto", "reward", "ppo", "iterate", "data check", "data merge",
            "score", "evaluate", "generate", "judge", "annotate", "demo"}


def _required_argv(parser):
    """Values for the positionals and required options of `parser`, so parsing gets as far
    as the unknown arguments."""
    argv = []
    for action in parser._actions:
        if not action.option_strings:
            argv.append("x")
        elif action.required:
            argv += [action.option_strings[0], "x"]
    return argv


def _prefix_case(parser):
    """A long flag of `parser` and a prefix of it that no other flag starts with."""
    flags = [s for a in parser._actions for s in a.option_strings
             if s.startswith("--") and s != "--help"]
    for action in parser._actions:
        for flag in action.option_strings:
            if not flag.startswith("--") or flag == "--help" or len(flag) < 6:
                continue
            prefix = flag[:-2]
            if [f for f in flags if f.startswith(prefix)] == [flag]:
                return flag, prefix, action.nargs == 0
    raise AssertionError(f"{parser.prog}: no flag with a unique prefix")


def test_every_command_refuses_a_prefix(capsys, monkeypatch):
    ran = []
    for name in ("_run_command",):
        monkeypatch.setattr(cli, name, lambda args, name=name: ran.append(name) or 0)
    seen = set()
    for words, parser in leaf_parsers(cli.build_parser()):
        seen.add(" ".join(words))
        flag, prefix, is_switch = _prefix_case(parser)
        argv = [*words, *_required_argv(parser), prefix, *([] if is_switch else ["1"])]
        code, err = run(capsys, argv)
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1, err
        assert f"prefalign {' '.join(words)}: error: unrecognized arguments: {prefix}" in err, err
        assert f"did you mean {flag}?" in err, err
    assert seen >= COMMANDS, COMMANDS - seen
    assert not ran


@pytest.mark.parametrize("argv, expected", [
    (["--version"], "prefalign "),
    (["dpo", "--help"], "usage: prefalign dpo"),
])
def test_python_dash_m_prefalign(argv, expected):
    out = subprocess.run([sys.executable, "-m", "prefalign", *argv], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(expected), out.stdout[:200]
    if "--help" in argv:
        assert "--learning-rate LEARNING_RATE, --lr LEARNING_RATE" in out.stdout
