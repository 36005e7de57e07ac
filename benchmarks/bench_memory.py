"""Peak memory of a DPO step as the vocabulary and the sequence length grow.

prefalign with the chunked LM head (--logps-chunk-size), prefalign without it, and TRL's
DPOTrainer (fastest CPU settings), each in its own process (peak RSS is per process).
Writes a table, a JSON file and, when matplotlib is installed, a PNG plot.

    .venv/bin/python benchmarks/bench_memory.py                       # both sweeps
    .venv/bin/python benchmarks/bench_memory.py --vocabs 32000,150000 --lengths 256

RSS includes the weights: the embedding and LM head alone grow by 2 * V * hidden * 4
bytes (fp32), which every framework pays. The plot therefore shows peak RSS minus the
weights (working memory: activations, logits, optimizer state, the interpreter), where
the vocabulary's cost is the logits alone; the JSON keeps both.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common import load_average, run_child, write_model_and_data

HERE = Path(__file__).resolve().parent
MODES = {  # label: dpo_worker arguments
    "prefalign chunked": ["prefalign", "--chunk-size", "256"],
    "prefalign": ["prefalign"],
    "TRL (fast)": ["trl-fast"],
}


def weights_mb(model_dir: Path) -> float:
    """Bytes of the model's parameters, in MB (fp32 on disk and in memory here)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def measure(root: Path, vocab: int, length: int, args, modes: list[str]) -> dict:
    """{"peak_rss_mb": {mode: MB}, "weights_mb": MB} for one (vocabulary, length) point."""
    words = max(4, length // 2)  # about one token per word: both halves fill max_length
    model, data = write_model_and_data(root / f"v{vocab}-l{length}", n_rows=args.batch_size * 4,
                                       prompt_words=words, completion_words=words,
                                       hidden=args.hidden, layers=args.layers, vocab=vocab)
    common = ["--model", str(model), "--data", str(data), "--steps", "3", "--warmup", "1",
              "--batch-size", str(args.batch_size), "--max-length", str(length),
              "--lora-r", str(args.lora_r)]
    out = {}
    for label in modes:
        out[label] = run_child(HERE / "dpo_worker.py", [*MODES[label], *common])["peak_rss_mb"]
        print(f"  vocab {vocab:>6} length {length:>5} {label:<18} {out[label]:>7.0f} MB", flush=True)
    return {"peak_rss_mb": out, "weights_mb": weights_mb(model)}


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, (("vocab", "vocabulary size"), ("length", "max length (tokens)"))):
        sweep = results[key]
        xs = [point["x"] for point in sweep]
        for mode in results["modes"]:
            ax.plot(xs, [point["peak_rss_mb"][mode] - point["weights_mb"] for point in sweep],
                    marker="o", label=mode)
        ax.set_xlabel(label)
        ax.set_ylabel("peak RSS minus weights (MB)")
        ax.grid(alpha=0.3)
        fixed = results["fixed"]
        ax.set_title(f"DPO step, batch {fixed['batch_size']} pairs, "
                     + (f"length {fixed['length']}" if key == "vocab" else f"vocab {fixed['vocab']}"))
    axes[0].legend()
    fig.suptitle(f"Peak memory, Llama-style hidden {results['fixed']['hidden']}, "
                 f"{results['fixed']['layers']} layers, LoRA r={results['fixed']['lora_r']} (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="32000,64000,100000,150000")
    parser.add_argument("--lengths", default="128,256,512,1024")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the length sweep")
    parser.add_argument("--length", type=int, default=256, help="max length of the vocab sweep")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--json", default=str(HERE / "memory_scaling.json"))
    parser.add_argument("--png", default=str(HERE / "memory_scaling.png"))
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in each child
    modes = args.modes.split(",")
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    results = {"modes": modes, "load_before": load_average(), "vocab": [], "length": [],
               "fixed": {"vocab": args.vocab, "length": args.length, "hidden": args.hidden,
                         "layers": args.layers, "batch_size": args.batch_size,
                         "lora_r": args.lora_r}}
    for vocab in map(int, args.vocabs.split(",")):
        results["vocab"].append({"x": vocab, **measure(root, vocab, args.length, args, modes)})
    for length in map(int, args.lengths.split(",")):
        results["length"].append({"x": length, **measure(root, args.vocab, length, args, modes)})
    results["load_after"] = load_average()
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    for key in ("vocab", "length"):
        print(f"\npeak RSS (MB) vs {key}; in brackets, minus the weights")
        print(f"{key:>8} {'weights':>8} " + " ".join(f"{m:>22}" for m in modes))
        for point in results[key]:
            cells = (f"{point['peak_rss_mb'][m]:>10.0f} ({point['peak_rss_mb'][m] - point['weights_mb']:>7.0f})"
                     for m in modes)
            print(f"{point['x']:>8} {point['weights_mb']:>8.0f} " + " ".join(f"{c:>22}" for c in cells))
    if plot(results, Path(args.png)):
        print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
