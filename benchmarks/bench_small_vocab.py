"""The small-vocabulary full fine-tuning DPO case: model, data and the two commands.

A Llama-style model of hidden 256, 4 layers and a 4,096-token vocabulary, pairs of
16-word prompts and completions, 8 pairs per step, full fine-tuning. With a small
vocabulary the LM head no longer dominates, so this case measures the rest of a step
(backbone, reference copy, optimizer, loop) and the start-up of a whole run.

    python benchmarks/bench_small_vocab.py setup DIR     # writes DIR/model, DIR/prefs.jsonl
    python benchmarks/bench_small_vocab.py commands DIR  # prints the two 30-step runs

Per-step throughput of the same case: bench_dpo.py --vocab 4096 --lora-r 0
--prompt-words 16 --completion-words 16 --max-length 64 (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden=256, layers=4, vocab=4096)
WORDS, MAX_LENGTH, BATCH, STEPS = 16, 64, 8, 30


def commands(root: Path, python: str) -> tuple[list[str], list[str]]:
    """(prefalign dpo, TRL DPOTrainer): the same 30-step full fine-tuning run."""
    model, data = str(root / "model"), str(root / "prefs.jsonl")
    ours = [str(Path(python).with_name("prefalign")), "dpo", "--model", model, "--data", data,
            "--output-dir", str(root / "out-prefalign"), "--max-steps", str(STEPS),
            "--batch-size", str(BATCH), "--grad-accum", "1", "--lora-r", "0",
            "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_LENGTH // 2),
            "--learning-rate", "5e-6", "--logging-steps", "10",
            "--overwrite"]  # a rerun with the same root replaces the previous run
    theirs = [python, str(HERE / "trl_dpo.py"), "--model", model, "--data", data,
              "--output-dir", str(root / "out-trl"), "--max-steps", str(STEPS),
              "--batch-size", str(BATCH), "--max-length", str(MAX_LENGTH)]
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("setup", "commands"))
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    if args.action == "setup":
        sys.path.insert(0, str(HERE))
        from common import write_model_and_data

        args.root.mkdir(parents=True, exist_ok=True)
        write_model_and_data(args.root, n_rows=BATCH * (STEPS + 2), prompt_words=WORDS,
                             completion_words=WORDS, **SHAPE)
    for cmd in commands(args.root.resolve(), sys.executable):
        print(" ".join(cmd))


if __name__ == "__main__":
    main()
