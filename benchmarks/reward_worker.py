"""One framework's reward-model run for bench_reward.py; prints a JSON line last."""

from __future__ import annotations

import tempfile

from common import peft_lora, prefalign_clock, run_worker, train_trl, trl_speed, worker_parser


def timed_prefalign(args) -> list:
    from prefalign.algorithms.reward import RewardConfig, run_reward

    config = RewardConfig(model=args.model, data=args.data, output_dir=tempfile.mkdtemp(),
                          max_steps=args.steps, batch_size=args.batch_size, grad_accum=1,
                          max_length=args.max_length, max_prompt_length=args.max_length // 2,
                          lora_r=args.lora_r, lora_dropout=0.0, learning_rate=1e-5,
                          logging_steps=1, seed=0, prefix_sharing=args.prefix_sharing)
    stamps: list = []
    prefalign_clock(stamps)
    run_reward(config)
    return stamps


def timed_trl(args) -> list:
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    config = trl.RewardConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, learning_rate=1e-5, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, **trl_speed(args.mode),
    )
    peft_config = peft_lora(args.lora_r, "SEQ_CLS") if args.lora_r else None
    return train_trl(trl.RewardTrainer, args.data, model=model, args=config,
                     processing_class=tokenizer, peft_config=peft_config)


def main() -> None:
    parser = worker_parser()
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--prefix-sharing", action="store_true", help="prefalign only")
    run_worker(parser.parse_args(), timed_prefalign, timed_trl)


if __name__ == "__main__":
    main()
