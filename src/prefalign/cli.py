"""The `prefalign` command: {command: (module, config class, run function, help)}.

Every command, trainers and tools alike, is built the same way: its config class gives the
flags (config.add_config_arguments), `--config YAML` and the flags give the values
(config.config_from_args: unknown keys refused naming the closest), and the run function
takes the config. A command's module is imported only when that command runs.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import NoReturn

from prefalign import __version__
from prefalign.errors import PrefalignError
from prefalign.hub import allow_downloads, offline_by_default
from prefalign.text import printable


class OneLineParser(argparse.ArgumentParser):
    """argparse with prefalign's one-line errors: a trainer's usage runs to dozens of
    lines and would bury the message; --help shows it on request.

    Prefixes of flags are refused (allow_abbrev=False): with abbreviations on, `--lr 1e-5`
    silently set --lr-scheduler, and a flag added later can change what a prefix means.
    Sub-parsers are built with this class too, so they inherit the setting.
    """

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, _usage_error(self.prog, message))


def _usage_error(prog: str, message: str) -> str:
    return f"{prog}: error: {message}; run `{prog} --help` for the valid arguments\n"


# subcommand -> (module, config class, run function, one-line help)
TRAINERS = {
    "sft": ("prefalign.algorithms.sft", "SFTConfig", "run_sft",
            "supervised fine-tuning on instruction, chat or plain-text data"),
    "dpo": ("prefalign.algorithms.dpo", "DPOConfig", "run_dpo",
            "preference optimisation: DPO and its variants (ipo, simpo, orpo, ...)"),
    "kto": ("prefalign.algorithms.kto", "KTOConfig", "run_kto",
            "KTO: alignment from unpaired thumbs-up/down completions (paired data is unpaired)"),
    "reward": ("prefalign.algorithms.reward", "RewardConfig", "run_reward",
               "train a reward model (Bradley-Terry) on preference pairs"),
    "ppo": ("prefalign.algorithms.ppo", "PPOConfig", "run_ppo",
            "PPO against a reward model or a scoring function"),
    "grpo": ("prefalign.algorithms.grpo", "GRPOConfig", "run_grpo",
             "GRPO: group-relative advantages over G samples per prompt, no critic"),
    "rloo": ("prefalign.algorithms.rloo", "RLOOConfig", "run_rloo",
             "RLOO: leave-one-out baselines over G samples per prompt, KL in the reward"),
    "reinforce-pp": ("prefalign.algorithms.reinforce_pp", "ReinforcePPConfig",
                     "run_reinforce_pp",
                     "REINFORCE++: KL-shaped token returns whitened over the batch, no critic"),
    "online-dpo": ("prefalign.algorithms.online_dpo", "OnlineDPOConfig", "run_online_dpo",
                   "online DPO: two samples per prompt, ranked by a scorer or a judge, "
                   "DPO on the pair"),
    "iterate": ("prefalign.algorithms.iterate", "IterateConfig", "run_iterate",
                "iterative DPO: rounds of sampling from the policy, scoring and DPO"),
}

# tool -> (module, config class, run function, one-line help, the module's name for the
# description); the run function takes the config and returns the exit code.
TOOLS = {
    "score": ("prefalign.scoring.score_command", "ScoreConfig", "run",
              "score responses or preference pairs with a reward model", "DESCRIPTION"),
    "demo": ("prefalign.demo.command", "DemoConfig", "run",
             "the whole pipeline on a built-in task with a tiny model, then a report",
             "DESCRIPTION"),
    "evaluate": ("prefalign.evaluation.command", "EvaluateConfig", "run_evaluate",
                 "compare models on the same prompts: rewards, win rates, KL, diversity; "
                 "writes report.json, report.md and report.html", "DESCRIPTION"),
    "annotate": ("prefalign.preferences.annotate", "AnnotateConfig", "run_annotate",
                 "rank generated candidates by hand: in the terminal, or with --serve on a "
                 "local web page for a team", "DESCRIPTION"),
    "generate": ("prefalign.preferences.best_of_n", "GenerateConfig", "run",
                 "best-of-N preference pairs: sample, score, pair", "DESCRIPTION"),
    "judge": ("prefalign.preferences.judge_command", "JudgeConfig", "run",
              "rank candidates with a judge model (local or OpenAI-compatible) and write the "
              "implied pairs", "DESCRIPTION"),
}

# `prefalign data WORD`: the same shape, one level down.
DATA = ("data", "inspect, merge, import and export preference data")
DATA_COMMANDS = {
    "check": ("prefalign.data.commands", "DataCheckConfig", "run_check",
              "validate a data file and summarise it", "CHECK_DESCRIPTION"),
    "merge": ("prefalign.data.commands", "DataMergeConfig", "run_merge",
              "merge preference files with per-file weights, dedupe and a val split",
              "MERGE_DESCRIPTION"),
}

# data subcommand -> (module, config class, run function, one-line help, description): the
# label tools.
LABEL_COMMANDS = {
    "agreement": ("prefalign.preferences.label_agreement", "AgreementConfig", "run_agreement",
                  "agreement between annotators: kappa, Krippendorff's alpha, disputed items",
                  "DESCRIPTION"),
    "export": ("prefalign.preferences.interchange", "ExportConfig", "run_export",
               "write candidates or labels for Argilla or Label Studio, or pairs for TRL",
               "EXPORT_DESCRIPTION"),
    "import": ("prefalign.preferences.interchange", "ImportConfig", "run_import",
               "read Argilla or Label Studio annotations as label rows", "IMPORT_DESCRIPTION"),
}

# `prefalign judge agreement ...` is parsed as this command (see main), so that plain
# `prefalign judge --input ...` keeps working without a subcommand word.
JUDGE_AGREEMENT = "judge-agreement"
JUDGE_AGREEMENT_COMMAND = (
    "prefalign.preferences.judge_agreement", "JudgeAgreementConfig", "run",
    "how well a judge's pairs agree with a human's", "DESCRIPTION")

CONFIG_NOTE = (" Options come from --config YAML (keys as below with underscores) and are "
               "overridden by flags.")


def _add_command(sub, name: str, entry: tuple, **parser_kwargs) -> None:
    """The parser of one command, from its config class: a flag (or a positional argument)
    per option, plus --config and --debug."""
    from prefalign.config import add_config_arguments

    module_name, config_name, _, help_text, *about = entry
    module = importlib.import_module(module_name)
    description = getattr(module, about[0]) if about else f"{help_text}."
    parser = sub.add_parser(name, help=help_text, description=description + CONFIG_NOTE,
                            **parser_kwargs)
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (flags "
                        "override it)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    add_config_arguments(parser, getattr(module, config_name))
    parser.set_defaults(func=_run_command, entry=entry)


def _run_command(args: argparse.Namespace) -> int:
    """Build the command's config (YAML, then flags; checked) and run it."""
    from prefalign.config import config_from_args

    module_name, config_name, run_name, *_ = args.entry
    module = importlib.import_module(module_name)
    config = config_from_args(getattr(module, config_name), args)
    if getattr(config, "allow_download", False):
        allow_downloads()
    code = getattr(module, run_name)(config)  # trainers return nothing
    if "torch.distributed" in sys.modules:  # a command that imported torch may have launched
        from prefalign.train.distributed import end_process_group

        end_process_group()
    return code if type(code) is int else 0


def _add_data(sub) -> None:
    data = sub.add_parser(DATA[0], help=DATA[1])
    data.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show the full traceback of an error")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    for name, entry in {**DATA_COMMANDS, **LABEL_COMMANDS}.items():
        _add_command(data_sub, name, entry)


def _command_word(argv: list[str]) -> str:
    """The subcommand in `argv` (its first word that is not a flag), or ''."""
    return next((word for word in argv if not word.startswith("-")), "")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command`, only that subcommand gets its options.

    Building a command's options imports its module, and with it torch and transformers
    (seconds); `prefalign dpo ...` needs only dpo's, and `prefalign --version` none.
    The other subcommands are still listed, with their one-line help.
    """
    parser = OneLineParser(
        prog="prefalign",
        description="Preference alignment for causal language models: LoRA, SFT, reward "
        "models, DPO and its variants, PPO, GRPO, RLOO, REINFORCE++, online DPO, preference "
        "data and evaluation reports.",
    )
    parser.add_argument("--version", action="version", version=f"prefalign {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, entry in {**TRAINERS, DATA[0]: None, **TOOLS}.items():
        if command not in (None, name):
            sub.add_parser(name, help=DATA[1] if entry is None else entry[3])
        elif entry is None:
            _add_data(sub)
        else:
            _add_command(sub, name, entry)
    if command == JUDGE_AGREEMENT:
        _add_command(sub, JUDGE_AGREEMENT, JUDGE_AGREEMENT_COMMAND,
                     prog="prefalign judge agreement")
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace
                    ) -> argparse.ArgumentParser:
    """The (sub-)parser of the command the user ran, e.g. that of `prefalign data check`."""
    for dest in ("command", "data_command"):
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, dest, None)
        if not actions or name not in actions[0].choices:
            break
        parser = actions[0].choices[name]
    return parser


def _closest_flag(word: str, flags: list[str]) -> str | None:
    """The flag a mistyped or shortened `word` most likely meant: the only flag it is a
    prefix of (what argparse's abbreviations used to pick), else the most similar one."""
    extensions = [f for f in flags if f.startswith(word)]
    if len(extensions) == 1:
        return extensions[0]
    close = difflib.get_close_matches(word, extensions or flags, n=1)
    return close[0] if close else None


def _unrecognized(extra: list[str], parser: argparse.ArgumentParser) -> str:
    """The error for arguments no parser took, naming the closest option of the command,
    as an unknown YAML key does (config.build_config)."""
    message = f"unrecognized arguments: {' '.join(extra)}"
    # Hidden flags (other commands' options, there to be refused by name) are no hint.
    flags = [s for a in parser._actions for s in a.option_strings
             if s.startswith("--") and s != "--help" and a.help is not argparse.SUPPRESS]
    close = [_closest_flag(a.split("=")[0], flags) for a in extra if a.startswith("--")]
    hints = sorted(set(filter(None, close)))
    return message + (f" (did you mean {', '.join(hints)}?)" if hints else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before the command's module imports huggingface_hub, which reads this setting once.
    offline_by_default()
    command = _command_word(argv)
    if command == "judge" and argv[argv.index("judge") + 1:][:1] == ["agreement"]:
        at = argv.index("judge")
        argv, command = [*argv[:at], JUDGE_AGREEMENT, *argv[at + 2:]], JUDGE_AGREEMENT
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Reported for the command the user ran: `prefalign dpo --help` lists its options.
        words = (getattr(args, "command", None), getattr(args, "data_command", None))
        prog = " ".join(["prefalign", *filter(None, words)]).replace(JUDGE_AGREEMENT,
                                                                     "judge agreement")
        message = _unrecognized(extra, _command_parser(parser, args))
        print(_usage_error(prog, message), end="", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except PrefalignError as exc:
        if args.debug:
            raise
        # Messages quote file names and server or model text: no raw ESC reaches the terminal.
        print(f"prefalign: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
