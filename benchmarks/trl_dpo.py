"""TRL's DPOTrainer as a command, the yardstick for `prefalign dpo` in whole-process timings.

    python benchmarks/trl_dpo.py --model DIR --data prefs.jsonl --output-dir OUT --max-steps 30

The same run as `prefalign dpo --grad-accum 1 --lora-r 0` with the options below: full
fine-tuning (the reference is a frozen copy), fp32 on the CPU, no gradient checkpointing,
logging every 10 steps, the final model saved to OUT/final, as prefalign does.
"""

from __future__ import annotations

import argparse
import os
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--logging-steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    config = trl.DPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, learning_rate=args.learning_rate,
        logging_steps=args.logging_steps, report_to="none", save_strategy="no", seed=0,
        use_cpu=True, bf16=False, gradient_checkpointing=False)
    dataset = load_dataset("json", data_files=args.data, split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset,
                                 processing_class=tokenizer)
        trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "final"))


if __name__ == "__main__":
    main()
