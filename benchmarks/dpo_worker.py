"""One framework's DPO run for bench_dpo.py; prints a JSON line of timings and memory."""

from __future__ import annotations

import tempfile

from common import peft_lora, prefalign_clock, run_worker, train_trl, trl_speed, worker_parser


def timed_prefalign(args) -> list:
    from prefalign.algorithms.dpo import DPOConfig, run_dpo

    config = DPOConfig(model=args.model, data=args.data, output_dir=tempfile.mkdtemp(),
                       max_steps=args.steps, batch_size=args.batch_size, grad_accum=1,
                       max_length=args.max_length, max_prompt_length=args.max_length // 2,
                       lora_r=args.lora_r, lora_dropout=0.0, learning_rate=1e-5,
                       logging_steps=1, seed=0, precompute_ref=args.precompute_ref,
                       prefix_sharing=args.prefix_sharing, logps_chunk_size=args.chunk_size)
    stamps: list = []
    prefalign_clock(stamps)
    run_dpo(config)
    return stamps


def timed_trl(args) -> list:
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    config = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, learning_rate=1e-5, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, precompute_ref_log_probs=args.precompute_ref,
        **trl_speed(args.mode),
    )
    peft_config = peft_lora(args.lora_r, "CAUSAL_LM") if args.lora_r else None
    return train_trl(trl.DPOTrainer, args.data, model=model, args=config,
                     processing_class=tokenizer, peft_config=peft_config)


def main() -> None:
    parser = worker_parser()
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precompute-ref", action="store_true")
    parser.add_argument("--prefix-sharing", action="store_true", help="prefalign only")
    parser.add_argument("--chunk-size", type=int, default=None, help="prefalign only")
    run_worker(parser.parse_args(), timed_prefalign, timed_trl)


if __name__ == "__main__":
    main()
