"""DPO on one CUDA GPU: prefalign vs TRL's DPOTrainer on a Qwen2-0.5B-shaped model.

A randomly initialised model with Qwen2-0.5B's shapes (hidden 896, 24 layers, 14 heads,
2 key-value heads, MLP 4864, vocabulary 151936, tied embeddings) in bf16, sequences of
about --max-length tokens, LoRA r=16 on q/k/v/o for both frameworks, or full fine-tuning
with the `+full` variant (`prefalign+full`, `trl-fast+full`; the reference is then a frozen
copy for both). Each mode runs in its own process; reported: tokens/s, peak CUDA memory
(max allocated) and MFU. A mode that fails is reported with its error; the others run.

    python benchmarks/bench_gpu_dpo.py --repeats 3 --json gpu_dpo.json
    python benchmarks/bench_gpu_dpo.py --smoke          # tiny shapes, runs on a CPU too

MFU = (8 * N * T + attention FLOPs) per step / (step time * peak bf16 FLOP/s), where N is
the parameters that take part in matmuls (every linear layer and the LM head), T the real
tokens of the step (prompt+chosen and prompt+rejected, however a framework lays them out),
8 = 2 (reference forward) + 6 (policy forward and backward), and attention FLOPs per
sequence of L tokens = 4 passes * 4 * layers * hidden * L^2 (QK^T and AV, causal masking
not discounted). Peak bf16 dense: 989 TFLOP/s for H100 SXM and H200 (--peak-tflops for
other GPUs). Prefix sharing does fewer FLOPs for the same T, so its MFU can exceed what the
hardware does: read it as useful work per second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 tie_word_embeddings=True, max_position_embeddings=4096)
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=4096, tie_word_embeddings=True,
             max_position_embeddings=512)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
VARIANTS = {"shared": {"prefix_sharing": True}, "chunk": {"logps_chunk_size": 1024},
            "gc": {"gradient_checkpointing": True}, "full": {"lora_r": 0}}
LORA_R = 16


def write_setup(root: Path, shape: dict, n_rows: int, max_length: int, seed: int = 0,
                words: int | None = None):
    """Model dir (bf16 safetensors) + JSONL rows of prompt/chosen/rejected text of `words`
    words each (default max_length / 2: prompt + completion then overflow a little and are
    truncated, as DPO trainers do)."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    sys.path.insert(0, str(HERE))
    from common import make_text

    from prefalign.tiny import build_tokenizer

    rng = random.Random(seed)
    tokenizer = build_tokenizer([make_text(rng, 30) for _ in range(200)], vocab_size=512)
    config = Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                             attn_implementation="sdpa")
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    words = words or max_length // 2  # the small vocabulary makes about one token per word
    data = root / "prefs.jsonl"
    with data.open("w") as handle:
        for _ in range(n_rows):
            handle.write(json.dumps({
                "prompt": make_text(rng, words), "chosen": " " + make_text(rng, words),
                "rejected": " " + make_text(rng, rng.randint(words // 2, words))}) + "\n")
    return model_dir, data


def matmul_params(shape: dict) -> int:
    d, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter
    return layers * per_layer + shape["vocab_size"] * d


def step_flops(shape: dict, sequence_lengths: list[int]) -> float:
    """FLOPs of one DPO step over sequences of the given real lengths (see the docstring)."""
    tokens = sum(sequence_lengths)
    attention = sum(4 * 4 * shape["num_hidden_layers"] * shape["hidden_size"] * n * n
                    for n in sequence_lengths)
    return 8 * matmul_params(shape) * tokens + attention


# -- worker (one mode, its own process) ------------------------------------------------


def _timed_prefalign(args, overrides: dict) -> list:
    from common import prefalign_clock

    from prefalign.algorithms.dpo import DPOConfig, run_dpo

    overrides = {"lora_r": LORA_R, **overrides}
    config = DPOConfig(model=args.model, data=args.data, output_dir=tempfile.mkdtemp(),
                       max_steps=args.steps, batch_size=args.batch_size, grad_accum=1,
                       max_length=args.max_length, max_prompt_length=args.max_length // 2,
                       lora_dropout=0.0, learning_rate=1e-5, logging_steps=1,
                       seed=0, mixed_precision="bf16" if args.device == "cuda" else "no",
                       **overrides)
    stamps: list = []
    prefalign_clock(stamps)
    run_dpo(config)
    return stamps


def _timed_trl(args, fast: bool, full: bool) -> list:
    import torch
    import trl
    from common import peft_lora, train_trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    cuda = args.device == "cuda"
    config = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, learning_rate=1e-5, logging_steps=1, report_to="none",
        save_strategy="no", seed=0, use_cpu=not cuda, bf16=cuda,
        **({"gradient_checkpointing": False} if fast else {}))
    return train_trl(trl.DPOTrainer, args.data, model=model, args=config,
                     processing_class=tokenizer,
                     peft_config=None if full else peft_lora(LORA_R, "CAUSAL_LM"))


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    name, *variants = args.worker.split("+")
    if name == "prefalign":
        overrides = {k: v for variant in variants for k, v in VARIANTS[variant].items()}
        stamps = _timed_prefalign(args, overrides)
    else:
        unknown = set(variants) - {"full"}
        if unknown:
            raise SystemExit(f"TRL modes take only the +full variant, not {sorted(unknown)}")
        stamps = _timed_trl(args, fast=name == "trl-fast", full="full" in variants)
    measured = len(stamps) - args.warmup
    cuda = args.device == "cuda"
    print(json.dumps({
        "mode": args.worker,
        "steps_per_s": measured / (stamps[-1][0] - stamps[args.warmup - 1][0]),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}))


# -- parent ------------------------------------------------------------------------------


def save(path: str | None, device: str, per_pair: float, flops: float, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps({"device": device, "per_pair": per_pair,
                                          "flops_per_step": flops, "results": results},
                                         indent=2) + "\n")


def gpu_parser(description: str, modes: str, steps: int) -> argparse.ArgumentParser:
    """The options of a GPU benchmark (this one and bench_gpu_reward.py), worker ones hidden."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--modes", default=modes)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak of this GPU")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; a CPU will do")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    return parser


def compare(script: str, args: argparse.Namespace, title: str, flops_of,
            words_per_token: float | None = None) -> None:
    """The parent process of a GPU benchmark: write the model and data, run each mode in a
    process of its own `--repeats` times (`script --worker MODE`), and report the median
    tokens/s, peak memory and MFU; --json is rewritten after each mode, so a time-out keeps
    what finished. flops_of(shape, sequence lengths) gives one step's FLOPs; rows have
    words_per_token * max_length words each (default: write_setup's)."""
    import statistics
    import subprocess

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit(f"{Path(script).name} needs a CUDA GPU (or --smoke for a tiny CPU run)")
    shape = SMOKE if args.smoke else QWEN2_05B
    if args.smoke:
        args.max_length, args.steps, args.warmup = min(args.max_length, 64), 4, 1
    root = Path(tempfile.mkdtemp(prefix=f"bench-{Path(script).stem}-"))
    words = int(args.max_length * words_per_token) if words_per_token else None
    model, data = write_setup(root, shape, args.batch_size * (args.steps + 2), args.max_length,
                              words=words)
    sys.path.insert(0, str(HERE))
    from common import tokens_per_pair

    per_pair = tokens_per_pair(model, data, args.max_length)
    # Two sequences per pair of about per_pair / 2 tokens each: the attention term's L.
    flops = flops_of(shape, [per_pair / 2] * (2 * args.batch_size))
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    results = {}
    for mode in args.modes.split(","):
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, script, "--worker", mode, "--model", str(model), "--data",
                   str(data), "--batch-size", str(args.batch_size), "--max-length",
                   str(args.max_length), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--device", "cuda" if cuda else "cpu"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                break
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if len(runs) < args.repeats:
            results[mode] = {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
            save(args.json, device_name, per_pair, flops, results)
            continue
        r = {k: statistics.median(x[k] for x in runs) if runs[0][k] is not None else None
             for k in runs[0] if k != "mode"}
        r["tokens_per_s"] = r["steps_per_s"] * args.batch_size * per_pair
        r["mfu"] = flops * r["steps_per_s"] / (peak * 1e12) if peak else None
        results[mode] = r
        save(args.json, device_name, per_pair, flops, results)
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"{title}, Qwen2-0.5B shapes{' (smoke: tiny)' if args.smoke else ''}, bf16, "
          f"LoRA r={LORA_R} (+full: full fine-tuning), batch {args.batch_size} pairs, "
          f"{per_pair:.0f} tokens per pair, on {device_name}, {started}, "
          f"median of {args.repeats}")
    print(f"{'mode':<22} {'tokens/s':>9} {'peak GB':>8} {'MFU':>6}")
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:<22} failed: {r['error'][0][:200]}")
            continue
        mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{mode:<22} {r['tokens_per_s']:>9.0f} {mem:>8} {mfu:>6}")


def main() -> None:
    parser = gpu_parser(__doc__.splitlines()[0], "prefalign,prefalign+shared,prefalign+chunk,"
                        "prefalign+gc,trl-fast,trl-default", steps=30)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    compare(__file__, args, "DPO", step_flops)


if __name__ == "__main__":
    main()
