"""Reward model on one CUDA GPU: prefalign vs TRL's RewardTrainer on a Qwen2-0.5B-shaped model.

The model, data and modes follow bench_gpu_dpo.py (random Qwen2-0.5B shapes, bf16, LoRA
r=16 on q/k/v/o, `+full` for full fine-tuning), with a scalar head on the backbone. Each
mode runs in its own process; reported: tokens/s, peak CUDA memory and MFU.

    python benchmarks/bench_gpu_reward.py --json gpu_reward.json
    python benchmarks/bench_gpu_reward.py --smoke          # tiny shapes, runs on a CPU too

MFU = (6 * N * T + attention FLOPs) per step / (step time * peak bf16 FLOP/s), where N is
the backbone's matmul parameters (no LM head: a reward model has a scalar head), T the
real tokens of the step (prompt+chosen and prompt+rejected), 6 = forward and backward, and
attention FLOPs per sequence of L tokens = 3 passes * 4 * layers * hidden * L^2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gpu_dpo import LORA_R, PEAK_TFLOPS, QWEN2_05B, SMOKE, matmul_params, write_setup  # noqa: E402


def step_flops(shape: dict, sequence_lengths: list[float]) -> float:
    """FLOPs of one reward step over sequences of the given real lengths."""
    backbone = matmul_params(shape) - shape["vocab_size"] * shape["hidden_size"]
    attention = sum(3 * 4 * shape["num_hidden_layers"] * shape["hidden_size"] * n * n
                    for n in sequence_lengths)
    return 6 * backbone * sum(sequence_lengths) + attention


def _timed_prefalign(args, full: bool) -> list:
    from common import prefalign_clock

    from prefalign.algorithms.reward import RewardConfig, run_reward

    config = RewardConfig(model=args.model, data=args.data, output_dir=tempfile.mkdtemp(),
                          max_steps=args.steps, batch_size=args.batch_size, grad_accum=1,
                          max_length=args.max_length, max_prompt_length=args.max_length // 2,
                          lora_r=0 if full else LORA_R, lora_dropout=0.0, learning_rate=1e-5,
                          logging_steps=1, seed=0,
                          mixed_precision="bf16" if args.device == "cuda" else "no")
    stamps: list = []
    prefalign_clock(stamps)
    run_reward(config)
    return stamps


def _timed_trl(args, full: bool) -> list:
    import torch
    import trl
    from common import peft_lora, train_trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cuda = args.device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=1, dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    config = trl.RewardConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, learning_rate=1e-5, logging_steps=1, report_to="none",
        save_strategy="no", seed=0, use_cpu=not cuda, bf16=cuda, gradient_checkpointing=False)
    return train_trl(trl.RewardTrainer, args.data, model=model, args=config,
                     processing_class=tokenizer,
                     peft_config=None if full else peft_lora(LORA_R, "SEQ_CLS"))


def worker(args) -> None:
    import torch

    name, *variants = args.worker.split("+")
    if set(variants) - {"full"}:
        raise SystemExit(f"the only variant is +full, not {args.worker!r}")
    timed = _timed_prefalign if name == "prefalign" else _timed_trl
    stamps = timed(args, full="full" in variants)
    cuda = args.device == "cuda"
    print(json.dumps({
        "mode": args.worker,
        "steps_per_s": (len(stamps) - args.warmup) / (stamps[-1][0] - stamps[args.warmup - 1][0]),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))


def save(path: str | None, device: str, per_pair: float, flops: float, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps({"device": device, "per_pair": per_pair,
                                          "flops_per_step": flops, "results": results},
                                         indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="prefalign,trl-fast,prefalign+full,trl-fast+full")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak of this GPU")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; a CPU will do")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from common import tokens_per_pair

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("bench_gpu_reward.py needs a CUDA GPU (or --smoke for a tiny CPU run)")
    shape = SMOKE if args.smoke else QWEN2_05B
    if args.smoke:
        args.max_length, args.steps, args.warmup = min(args.max_length, 64), 4, 1
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-reward-"))
    # TRL's RewardTrainer drops pairs over max_length instead of truncating them: rows
    # of a third of max_length words each fit whole.
    model, data = write_setup(root, shape, args.batch_size * (args.steps + 2), args.max_length,
                              words=args.max_length // 3)
    per_pair = tokens_per_pair(model, data, args.max_length)
    flops = step_flops(shape, [per_pair / 2] * (2 * args.batch_size))
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    results = {}
    for mode in args.modes.split(","):
        runs, error = [], None
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--worker", mode, "--model", str(model), "--data",
                   str(data), "--batch-size", str(args.batch_size), "--max-length",
                   str(args.max_length), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--device", "cuda" if cuda else "cpu"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                error = proc.stderr.strip().splitlines()[-1:] or ["failed"]
                break
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if error:
            results[mode] = {"error": error}
            save(args.json, device_name, per_pair, flops, results)
            continue
        r = {k: statistics.median(x[k] for x in runs) if runs[0][k] is not None else None
             for k in ("steps_per_s", "peak_mem_gb")}
        r["tokens_per_s"] = r["steps_per_s"] * args.batch_size * per_pair
        r["mfu"] = flops * r["steps_per_s"] / (peak * 1e12) if peak else None
        results[mode] = r
        save(args.json, device_name, per_pair, flops, results)  # after each mode: a time-out keeps them
    print(f"reward model, Qwen2-0.5B shapes{' (smoke: tiny)' if args.smoke else ''}, bf16, "
          f"LoRA r={LORA_R} (+full: full fine-tuning), batch {args.batch_size} pairs, "
          f"{per_pair:.0f} tokens per pair, on {device_name}, median of {args.repeats}")
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:<22} failed: {r['error'][0][:200]}")
            continue
        mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{mode:<22} {r['tokens_per_s']:>9.0f} tokens/s {mem:>8} GB {mfu:>6}")
    save(args.json, device_name, per_pair, flops, results)


if __name__ == "__main__":
    main()
