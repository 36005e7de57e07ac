"""One framework's DPO run for bench_dpo.py; prints a JSON line of timings and memory."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch
from common import peak_rss_mb


def timed_prefalign(args) -> list[float]:
    from prefalign.algorithms.dpo import DPOConfig, run_dpo

    config = DPOConfig(model=args.model, data=args.data, output_dir=tempfile.mkdtemp(),
                       max_steps=args.steps, batch_size=args.batch_size, grad_accum=1,
                       max_length=args.max_length, max_prompt_length=args.max_length // 2,
                       lora_r=args.lora_r, lora_dropout=0.0, learning_rate=1e-5,
                       logging_steps=1, seed=0, precompute_ref=args.precompute_ref)
    result = run_dpo(config)
    return [r["elapsed_s"] for r in result.history if "elapsed_s" in r]


def timed_trl(args) -> list[float]:
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.clear()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter() - self.start)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    # TRL's defaults are bf16 autocast and gradient checkpointing; on a CPU both are slower,
    # so "trl-fast" turns them off.
    speed = {"bf16": False, "gradient_checkpointing": False} if args.mode == "trl-fast" else {}
    config = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, learning_rate=1e-5, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, precompute_ref_log_probs=args.precompute_ref,
        **speed,
    )
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                 task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=args.data, split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, peft_config=peft_config)
        trainer.add_callback(Clock())
        trainer.train()
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["prefalign", "trl-fast", "trl-default"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--precompute-ref", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stamps = timed_prefalign(args) if args.mode == "prefalign" else timed_trl(args)
    measured = len(stamps) - args.warmup
    seconds = stamps[-1] - stamps[args.warmup - 1]
    print(json.dumps({"mode": args.mode, "steps_per_s": measured / seconds,
                      "seconds": seconds, "measured_steps": measured,
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
