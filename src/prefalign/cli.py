"""The `prefalign` command: parse arguments, call one library function per subcommand."""

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


def _data_check(args: argparse.Namespace) -> int:
    from prefalign.data.chat import tokens_line
    from prefalign.data.check import check_file
    from prefalign.errors import ConfigError
    from prefalign.models import load_tokenizer

    if not args.model and (args.chat_template or args.text_as_chat):
        flag = "--chat-template" if args.chat_template else "--text-as-chat"
        raise ConfigError(f"{flag} needs --model: without a tokenizer nothing is tokenized")
    tokenizer = None
    if args.model:
        tokenizer = load_tokenizer(args.model, chat_template=args.chat_template,
                                   text_as_chat=args.text_as_chat)
    # How the rows were read and tokenized goes under the counts, before the lengths.
    notes = [tokens_line(tokenizer)] if tokenizer is not None else []
    summary = check_file(args.file, tokenizer=tokenizer, max_length=args.max_length,
                         max_prompt_length=args.max_prompt_length, strict=args.strict,
                         split=args.split, columns=args.columns,
                         kind="unpaired" if args.kind == "kto" else args.kind,
                         max_drop_fraction=args.max_drop_fraction,
                         log=lambda line: notes.append(f"data: {line}"))
    lines = summary.format().splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("lengths in")), len(lines))
    print("\n".join(lines[:at] + notes + lines[at:]), flush=True)
    if summary.normalize.kept and summary.too_many_dropped:
        from prefalign.errors import DataError

        raise DataError(summary.normalize.drop_error(summary.source, args.max_drop_fraction))
    return 0 if summary.ok else 1


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
    "iterate": ("prefalign.algorithms.iterate", "IterateConfig", "run_iterate",
                "iterative DPO: rounds of sampling from the policy, scoring and DPO"),
}


def _trainer_parser(sub, name: str) -> None:
    from prefalign.config import add_config_arguments

    module, config_name, _, help_text = TRAINERS[name]
    config_cls = getattr(importlib.import_module(module), config_name)
    parser = sub.add_parser(
        name, help=help_text, description=f"{help_text}. Options come from --config YAML "
        "(keys as below with underscores) and are overridden by flags.",
    )
    parser.add_argument("--config", help="YAML file of options (flags override it)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    add_config_arguments(parser, config_cls)
    parser.set_defaults(func=_run_trainer, trainer=name)


def _run_trainer(args: argparse.Namespace) -> int:
    from prefalign.config import config_from_args

    module, config_name, run_name, _ = TRAINERS[args.trainer]
    module = importlib.import_module(module)
    config = config_from_args(getattr(module, config_name), args)
    if config.allow_download:
        allow_downloads()
    getattr(module, run_name)(config)
    return 0


def _data_merge(args: argparse.Namespace) -> int:
    from prefalign.preferences.merge import merge_preferences, parse_input_spec

    report = merge_preferences(
        [parse_input_spec(text) for text in args.inputs], args.output, mode=args.mode,
        dedupe=args.dedupe, val_fraction=args.val_fraction, seed=args.seed,
        stratify_by=args.stratify_by or None, val_output=args.val_output)
    print(report.format())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from prefalign.preferences.best_of_n import run

    return run(args)


def _judge(args: argparse.Namespace) -> int:
    from prefalign.preferences.judge import run

    return run(args)


def _judge_agreement(args: argparse.Namespace) -> int:
    from prefalign.preferences.judge_agreement import run

    return run(args)


def _score(args: argparse.Namespace) -> int:
    from prefalign.algorithms.reward import score_file

    score_file(args.reward_model, args.data, args.output, args.batch_size,
               max_length=args.max_length, max_prompt_length=args.max_prompt_length,
               trust_remote_code=args.trust_remote_code, chat_template=args.chat_template,
               text_as_chat=args.text_as_chat)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from prefalign.demo import run_demo

    run_demo(args.output_dir, quick=args.quick, force=args.force, seed=args.seed)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from prefalign.evaluation.command import run_evaluate

    run_evaluate(args)
    return 0


def _annotate(args: argparse.Namespace) -> int:
    from prefalign.preferences.annotate import run

    return run(args)


def _add_data(sub) -> None:
    from prefalign.data.chat import add_chat_arguments

    data = sub.add_parser("data", help=TOOLS["data"][1])
    data.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show the full traceback of an error")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    check = data_sub.add_parser(
        "check", help="validate a data file and summarise it",
        description="Read a data file (JSONL, JSON, Parquet, CSV or a datasets folder), "
        "map its columns or recognise its hub schema, normalise every row as the trainer "
        "will and print rows, formats, dropped rows with reasons and length percentiles, "
        "and with --model one example as the model sees it. Exits 0 when rows are usable, "
        "1 when every row was dropped, 2 on a malformed file or row (naming file, line or "
        "row, and field), when more than --max-drop-fraction of the rows were dropped and, "
        "under --strict, on a droppable row.")
    check.add_argument("file", help="data file or datasets folder")
    check.add_argument("--model", help="model or tokenizer directory: lengths in tokens and "
                       "one example rendered as the model sees it (default: lengths in "
                       "characters)")
    check.add_argument("--kind", choices=("auto", "preference", "sft", "kto"), default="auto",
                       help="read the rows as the trainer of this kind does: preference (dpo, "
                       "reward), sft or kto; auto: from a recognised hub schema, else from the "
                       "first row's fields (default: auto)")
    check.add_argument("--columns", metavar="TARGET=SOURCE,...",
                       help="read fields from other column names, e.g. "
                       "prompt=question,system=system")
    check.add_argument("--split", help="split of a DatasetDict folder or cached dataset "
                       "(default: train; a DatasetDict without one is refused)")
    check.add_argument("--max-drop-fraction", type=float, default=0.05,
                       help="exit 2 when more than this fraction of the rows is dropped "
                       "(default: 0.05)")
    check.add_argument("--max-length", type=int, default=1024,
                       help="maximum prompt+completion tokens (default: 1024)")
    check.add_argument("--max-prompt-length", type=int, default=512,
                       help="maximum prompt tokens (default: 512)")
    check.add_argument("--strict", action="store_true",
                       help="treat droppable rows (empty completion, chosen == rejected) as errors")
    add_chat_arguments(check, whose="--model's tokenizer", note="; needs --model")
    check.set_defaults(func=_data_check)
    merge = data_sub.add_parser(
        "merge", help="merge preference files with per-file weights, dedupe and a val split",
        description="Read preference files in any format prefalign loads, weight each file, "
        "remove exact duplicate pairs (keeping the heaviest copy) and write normalised JSONL "
        "rows with source and weight, plus a validation split drawn in the same proportion "
        "from every source.")
    merge.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]",
                       help="preference files; a number after the last colon is the file's "
                       "weight (default 1), e.g. b.jsonl:5; a path that itself ends in "
                       "':NUMBER' needs an explicit weight, e.g. data:2:1")
    merge.add_argument("--output", "-o", required=True, help="merged training file (.jsonl)")
    merge.add_argument("--mode", choices=("column", "repeat"), default="column",
                       help="column: multiply each row's weight column by the file's weight; "
                       "repeat: write each row WEIGHT times (whole numbers only) "
                       "(default: column)")
    merge.add_argument("--val-fraction", type=float, default=0.0,
                       help="fraction of every source held out for validation (default: 0)")
    merge.add_argument("--val-output",
                       help="validation file (default: OUTPUT with .val before the suffix)")
    merge.add_argument("--stratify-by", default="source",
                       help="column whose values are split in equal proportion; '' for none "
                       "(default: source)")
    merge.add_argument("--no-dedupe", dest="dedupe", action="store_false",
                       help="keep exact duplicate (prompt, chosen, rejected) rows")
    merge.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    merge.set_defaults(func=_data_merge)


def _add_score(sub) -> None:
    from prefalign.data.chat import add_chat_arguments
    from prefalign.hub import DOWNLOAD_HELP

    score = sub.add_parser(
        "score", help=TOOLS["score"][1],
        description="Score every row of a data file with a reward model and write the rows "
        "with their scores as JSONL: preference pairs get score_chosen and score_rejected, "
        "prompt + response (or completion, or a conversation in messages) rows get score. "
        "Sequences are formatted and truncated exactly as in reward training.")
    score.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    score.add_argument("--reward-model", required=True,
                       help="reward model directory (OUTPUT/final of prefalign reward)")
    score.add_argument("--data", required=True,
                       help="rows to score: JSONL, JSON, Parquet, CSV or a datasets folder")
    score.add_argument("--output", help="JSONL to write (default: DATA.scored.jsonl)")
    score.add_argument("--batch-size", type=int, default=8,
                       help="sequences per forward pass (default: 8)")
    score.add_argument("--max-length", type=int, default=1024,
                       help="maximum prompt+response tokens, as in training (default: 1024)")
    score.add_argument("--max-prompt-length", type=int, default=512,
                       help="maximum prompt tokens, as in training (default: 512)")
    score.add_argument("--trust-remote-code", action="store_true",
                       help="allow model code from the model directory to run")
    score.add_argument("--allow-download", action="store_true", help=DOWNLOAD_HELP)
    add_chat_arguments(score, whose="the reward model's tokenizer",
                       note="; a template given in training is already saved with it",
                       text_note="; give it when training did")
    score.set_defaults(func=_score)


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo", help=TOOLS["demo"][1],
        description="Offline, on a built-in task (steer review continuations toward positive "
        "sentiment, scored by a fixed lexicon): build a tiny model, SFT, best-of-N pairs with "
        "noisy labels, reward model, DPO, PPO, sweeps of DPO's beta and PPO's KL "
        "coefficient, evaluation on held-out prompts, and report.html. Finished stages are "
        "reused on a second run.")
    demo.add_argument("--output-dir", default="demo-output",
                      help="where everything is written (default: demo-output)")
    demo.add_argument("--quick", action="store_true",
                      help="a faster variant: the same main runs, two sweep points each instead "
                           "of four for DPO and three for PPO")
    demo.add_argument("--force", action="store_true", help="rerun every stage")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    demo.set_defaults(func=_demo)


def _add_evaluate(sub) -> None:
    from prefalign.evaluation.command import DESCRIPTION, add_arguments

    evaluate = sub.add_parser(
        "evaluate", help=TOOLS["evaluate"][1], description=DESCRIPTION)
    evaluate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")
    add_arguments(evaluate)
    evaluate.set_defaults(func=_evaluate)


def _add_annotate(sub) -> None:
    from prefalign.preferences import annotate as annotate_module

    annotate = sub.add_parser(
        "annotate", help=TOOLS["annotate"][1],
        description=annotate_module.DESCRIPTION)
    annotate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")
    annotate_module.add_arguments(annotate)
    annotate.set_defaults(func=_annotate)


def _add_generate(sub) -> None:
    from prefalign.preferences import best_of_n as best_of_n_module

    generate = sub.add_parser(
        "generate", help=TOOLS["generate"][1],
        description=best_of_n_module.DESCRIPTION)
    generate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")
    best_of_n_module.add_arguments(generate)
    generate.set_defaults(func=_generate)


def _add_judge(sub) -> None:
    from prefalign.preferences import judge as judge_module

    judge = sub.add_parser(
        "judge", help=TOOLS["judge"][1],
        description=judge_module.DESCRIPTION)
    judge.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    judge_module.add_arguments(judge)
    judge.set_defaults(func=_judge)


# `prefalign judge agreement ...` is parsed as this command (see main), so that plain
# `prefalign judge --input ...` keeps working without a subcommand word.
JUDGE_AGREEMENT = "judge-agreement"


def _add_judge_agreement(sub) -> None:
    from prefalign.preferences import judge_agreement

    agreement = sub.add_parser(JUDGE_AGREEMENT, prog="prefalign judge agreement",
                               description=judge_agreement.DESCRIPTION)
    agreement.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the full traceback of an error")
    judge_agreement.add_arguments(agreement)
    agreement.set_defaults(func=_judge_agreement)


# tool -> (adds its parser, one-line help); a trainer's parser comes from its config class.
TOOLS = {
    "data": (_add_data, "inspect and merge preference data"),
    "score": (_add_score, "score responses or preference pairs with a reward model"),
    "demo": (_add_demo, "the whole pipeline on a built-in task with a tiny model, then a report"),
    "evaluate": (_add_evaluate, "compare models on the same prompts: rewards, win rates, KL, "
                 "diversity; writes report.json, report.md and report.html"),
    "annotate": (_add_annotate, "rank generated candidates by hand in the terminal"),
    "generate": (_add_generate, "best-of-N preference pairs: sample, score, pair"),
    "judge": (_add_judge, "rank candidates with a judge model (local or OpenAI-compatible) and "
              "write the implied pairs"),
}


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
        "models, DPO and its variants, PPO, preference data and evaluation reports.",
    )
    parser.add_argument("--version", action="version", version=f"prefalign {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (*_, help_text) in TRAINERS.items():
        if command in (None, name):
            _trainer_parser(sub, name)
        else:
            sub.add_parser(name, help=help_text)
    for name, (add, help_text) in TOOLS.items():
        if command in (None, name):
            add(sub)
        else:
            sub.add_parser(name, help=help_text)
    if command == JUDGE_AGREEMENT:
        _add_judge_agreement(sub)
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
    flags = [s for a in parser._actions for s in a.option_strings
             if s.startswith("--") and s != "--help"]
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
    if getattr(args, "allow_download", False) is True:  # a tool's flag; trainers: config
        allow_downloads()
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
