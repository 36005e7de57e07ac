"""The `prefalign` command: parse arguments, call one library function per subcommand."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import NoReturn

from prefalign import __version__
from prefalign.errors import PrefalignError


class OneLineParser(argparse.ArgumentParser):
    """argparse with prefalign's one-line errors: a trainer's usage runs to dozens of
    lines and would bury the message; --help shows it on request."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, _usage_error(self.prog, message))


def _usage_error(prog: str, message: str) -> str:
    return f"{prog}: error: {message}; run `{prog} --help` for the valid arguments\n"


def _data_check(args: argparse.Namespace) -> int:
    from prefalign.data.check import check_file
    from prefalign.models import load_tokenizer

    tokenizer = load_tokenizer(args.model) if args.model else None
    summary = check_file(args.file, tokenizer=tokenizer, max_length=args.max_length,
                         max_prompt_length=args.max_prompt_length, strict=args.strict)
    print(summary.format())
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


def _score(args: argparse.Namespace) -> int:
    from prefalign.algorithms.reward import score_file

    score_file(args.reward_model, args.data, args.output, args.batch_size,
               max_length=args.max_length, max_prompt_length=args.max_prompt_length,
               trust_remote_code=args.trust_remote_code)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from prefalign.demo import run_demo

    run_demo(args.output_dir, quick=args.quick, force=args.force, seed=args.seed)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from prefalign.evaluation.evaluate import run_evaluate

    run_evaluate(args)
    return 0


def _annotate(args: argparse.Namespace) -> int:
    from prefalign.preferences.annotate import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="prefalign",
        description="Preference alignment for causal language models: LoRA, SFT, reward "
        "models, DPO and its variants, PPO, preference data and evaluation reports.",
    )
    parser.add_argument("--version", action="version", version=f"prefalign {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in TRAINERS:
        _trainer_parser(sub, name)

    data = sub.add_parser("data", help="inspect and merge preference data")
    data.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show the full traceback of an error")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    check = data_sub.add_parser(
        "check", help="validate a preference file and summarise it",
        description="Read a preference file (JSONL, JSON, Parquet, CSV or a datasets folder), "
        "normalise every row and print rows, formats, dropped rows with reasons and length "
        "percentiles. Exits 0 when rows are usable, 1 when every row was dropped, 2 on a "
        "malformed file or row (naming file, line or row, and field) and, under --strict, "
        "on a droppable row.")
    check.add_argument("file", help="preference file or datasets folder")
    check.add_argument("--model", help="model or tokenizer directory: lengths in tokens "
                       "(default: lengths in characters)")
    check.add_argument("--max-length", type=int, default=1024,
                       help="maximum prompt+completion tokens (default: 1024)")
    check.add_argument("--max-prompt-length", type=int, default=512,
                       help="maximum prompt tokens (default: 512)")
    check.add_argument("--strict", action="store_true",
                       help="treat droppable rows (empty completion, chosen == rejected) as errors")
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

    score = sub.add_parser(
        "score", help="score responses or preference pairs with a reward model",
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
    score.set_defaults(func=_score)

    demo = sub.add_parser(
        "demo", help="the whole pipeline on a built-in task with a tiny model, then a report",
        description="Offline, on a built-in task (steer review continuations toward positive "
        "sentiment, scored by a fixed lexicon): build a tiny model, SFT, best-of-N pairs with "
        "noisy labels, reward model, DPO (LoRA), PPO, sweeps of DPO's beta and PPO's KL "
        "coefficient, evaluation on held-out prompts, and report.html. Finished stages are "
        "reused on a second run.")
    demo.add_argument("--output-dir", default="demo-output",
                      help="where everything is written (default: demo-output)")
    demo.add_argument("--quick", action="store_true",
                      help="a faster variant: the same main runs, two sweep points each instead "
                           "of three")
    demo.add_argument("--force", action="store_true", help="rerun every stage")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    demo.set_defaults(func=_demo)

    from prefalign.evaluation.evaluate import DESCRIPTION, add_arguments

    evaluate = sub.add_parser(
        "evaluate", help="compare models on the same prompts: rewards, win rates, KL, "
        "diversity; writes report.json, report.md and report.html", description=DESCRIPTION)
    evaluate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")
    add_arguments(evaluate)
    evaluate.set_defaults(func=_evaluate)

    from prefalign.preferences import annotate as annotate_module

    annotate = sub.add_parser("annotate", help="rank generated candidates by hand in the terminal",
                              description=annotate_module.DESCRIPTION)
    annotate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")
    annotate_module.add_arguments(annotate)
    annotate.set_defaults(func=_annotate)

    from prefalign.preferences import best_of_n as best_of_n_module
    from prefalign.preferences import judge as judge_module

    generate = sub.add_parser("generate", help="best-of-N preference pairs: sample, score, pair",
                              description=best_of_n_module.DESCRIPTION)
    generate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")
    best_of_n_module.add_arguments(generate)
    generate.set_defaults(func=_generate)

    judge = sub.add_parser("judge", help="rank candidates with a judge model (local or "
                           "OpenAI-compatible) and write the implied pairs",
                           description=judge_module.DESCRIPTION)
    judge.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    judge_module.add_arguments(judge)
    judge.set_defaults(func=_judge)
    return parser


def _unrecognized(extra: list[str], args: argparse.Namespace) -> str:
    """The error for arguments no parser took, naming the closest trainer option, as an
    unknown YAML key does (config.build_config)."""
    message = f"unrecognized arguments: {' '.join(extra)}"
    trainer = getattr(args, "trainer", None)
    if trainer is None:
        return message
    from prefalign.config import config_flags

    module, config_name, _, _ = TRAINERS[trainer]
    flags = config_flags(getattr(importlib.import_module(module), config_name))
    close = [difflib.get_close_matches(a.split("=")[0], flags, n=1) for a in extra
             if a.startswith("--")]
    hints = sorted({match[0] for match in close if match})
    return message + (f" (did you mean {', '.join(hints)}?)" if hints else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Reported for the command the user ran: `prefalign dpo --help` lists its options.
        words = (getattr(args, "command", None), getattr(args, "data_command", None))
        prog = " ".join(["prefalign", *filter(None, words)])
        print(_usage_error(prog, _unrecognized(extra, args)), end="", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except PrefalignError as exc:
        if args.debug:
            raise
        print(f"prefalign: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
