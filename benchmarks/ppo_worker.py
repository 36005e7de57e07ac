"""One framework's PPO run for bench_ppo.py; prints a JSON line last."""

from __future__ import annotations

import json
import tempfile
import warnings

from common import peft_lora, prefalign_clock, run_worker, trl_clock, trl_speed, worker_parser


def timed_prefalign(args) -> list:
    from prefalign.algorithms.ppo import PPOConfig, run_ppo

    config = PPOConfig(model=args.model, data=args.data, reward_model=args.reward_model,
                       value_model=args.reward_model, output_dir=tempfile.mkdtemp(),
                       max_steps=args.steps, batch_size=args.batch_size, grad_accum=1,
                       ppo_epochs=4, num_mini_batches=1, max_new_tokens=args.response_length,
                       temperature=0.7, kl_coef=0.05, lora_r=args.lora_r, lora_dropout=0.0,
                       learning_rate=1e-6, logging_steps=1, seed=0, num_samples=0)
    stamps: list = []
    prefalign_clock(stamps)
    run_ppo(config)
    return stamps


def timed_trl(args) -> list:
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if not hasattr(trl, "PPOTrainer"):
        raise SystemExit(f"trl {trl.__version__} has no PPOTrainer: see bench_ppo.py's --trl-path")
    stamps: list = []
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(args.model)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.model) if not args.lora_r else None
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    with open(args.data) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    config = trl.PPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=4,
        response_length=args.response_length, total_episodes=args.batch_size * args.steps,
        temperature=0.7, kl_coef=0.05, learning_rate=1e-6, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, num_sample_generations=0, **trl_speed(args.mode),
    )
    peft_config = peft_lora(args.lora_r, "CAUSAL_LM") if args.lora_r else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.PPOTrainer(args=config, processing_class=tokenizer, model=policy,
                                 ref_model=ref_policy, reward_model=reward, value_model=value,
                                 train_dataset=dataset, peft_config=peft_config)
        trainer.add_callback(trl_clock(stamps))
        trainer.train()
    return stamps


def main() -> None:
    parser = worker_parser(steps=8, warmup=2)
    parser.add_argument("--reward-model", required=True)
    parser.add_argument("--response-length", type=int, default=32)
    parser.set_defaults(lora_r=0)
    run_worker(parser.parse_args(), timed_prefalign, timed_trl)


if __name__ == "__main__":
    main()
