"""The `prefalign` command: parse arguments, call one library function per subcommand."""

from __future__ import annotations

import argparse
import sys

from prefalign import __version__
from prefalign.errors import PrefalignError


def _data_check(args: argparse.Namespace) -> int:
    from prefalign.data.check import check_file
    from prefalign.models import load_tokenizer

    tokenizer = load_tokenizer(args.model) if args.model else None
    summary = check_file(args.file, tokenizer=tokenizer, max_length=args.max_length,
                         max_prompt_length=args.max_prompt_length, strict=args.strict)
    print(summary.format())
    return 0 if summary.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefalign",
        description="Preference alignment for causal language models: LoRA, SFT, reward "
        "models, DPO and its variants, PPO, preference data and evaluation reports.",
    )
    parser.add_argument("--version", action="version", version=f"prefalign {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="inspect preference data")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    check = data_sub.add_parser(
        "check", help="validate a preference file and summarise it",
        description="Read a preference file (JSONL, JSON, Parquet, CSV or a datasets folder), "
        "normalise every row and print rows, formats, dropped rows with reasons and length "
        "percentiles. Exits 1 when rows were dropped under --strict or errors were found, "
        "2 on a malformed file.")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
