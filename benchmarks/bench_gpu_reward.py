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

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gpu_dpo import LORA_R, compare, gpu_parser, matmul_params  # noqa: E402


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


def main() -> None:
    parser = gpu_parser(__doc__.splitlines()[0],
                        "prefalign,trl-fast,prefalign+full,trl-fast+full", steps=20)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    # TRL's RewardTrainer drops pairs over max_length instead of truncating them: rows
    # of a third of max_length words each fit whole.
    compare(__file__, args, "reward model", step_flops, words_per_token=1 / 3)


if __name__ == "__main__":
    main()
