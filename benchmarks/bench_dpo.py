"""DPO step throughput and peak memory: prefalign vs TRL's DPOTrainer, side by side.

Same Llama-style model, data, batch size, max length and LoRA rank for both; TRL runs with
its fastest CPU settings (bf16 and gradient checkpointing off) and with its defaults.

    .venv/bin/python benchmarks/bench_dpo.py            # prints a table and the ratios
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import run_child, write_model_and_data

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--completion-words", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lora-r", type=int, default=16, help="0 = full fine-tuning")
    parser.add_argument("--precompute-ref", action="store_true")
    parser.add_argument("--modes", default="prefalign,trl-fast,trl-default")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    model, data = write_model_and_data(root, n_rows=args.batch_size * (args.steps + 2),
                                       prompt_words=args.prompt_words,
                                       completion_words=args.completion_words,
                                       hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    common = ["--model", str(model), "--data", str(data), "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
              "--lora-r", str(args.lora_r)] + (["--precompute-ref"] if args.precompute_ref else [])
    results = {mode: run_child(HERE / "dpo_worker.py", [mode, *common])
               for mode in args.modes.split(",")}
    print(f"DPO, Llama-style hidden={args.hidden} layers={args.layers} vocab={args.vocab}, "
          f"batch {args.batch_size} pairs, max_length {args.max_length}, "
          f"{'LoRA r=' + str(args.lora_r) if args.lora_r else 'full fine-tuning'}"
          f"{', precomputed reference' if args.precompute_ref else ''}")
    print(f"{'mode':<12} {'steps/s':>8} {'pairs/s':>8} {'peak RSS MB':>12}")
    for mode, r in results.items():
        print(f"{mode:<12} {r['steps_per_s']:>8.3f} {r['steps_per_s'] * args.batch_size:>8.2f} "
              f"{r['peak_rss_mb']:>12.0f}")
    ours = results.get("prefalign")
    for mode in ("trl-fast", "trl-default"):
        if ours and mode in results:
            r = results[mode]
            print(f"prefalign / {mode}: throughput x{ours['steps_per_s'] / r['steps_per_s']:.2f}, "
                  f"peak memory x{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
