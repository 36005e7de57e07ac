"""One framework's GRPO run for bench_grpo.py; prints a JSON line last.

The work is matched, not assumed: the line reports the optimizer steps taken, the
completions scored and the completion tokens sampled, and bench_grpo.py refuses a
comparison where they differ.

    python grpo_worker.py prefalign|trl-fast|trl-default --model DIR --data prompts.jsonl
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings

from common import report, stamp, trl_speed, worker_parser

# What both frameworks count of the work they did (filled in by the wrappers below).
WORK = {"optimizer_steps": 0, "completions": 0, "completion_tokens": 0}
# CPU seconds spent sampling the completions, all iterations (where the time goes).
PHASES = {"generate_cpu_s": 0.0}


def timed(fn):
    """fn, adding its CPU seconds to PHASES["generate_cpu_s"]."""
    def wrapper(*a, **k):
        start = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            PHASES["generate_cpu_s"] += time.process_time() - start
    return wrapper


def letter_e(prompts, completions, **kwargs) -> list[float]:
    """The reward of both frameworks, in TRL's signature: the share of 'e' in the text."""
    WORK["completions"] += len(completions)
    return [text.count("e") / max(1, len(text)) for text in completions]


def timed_prefalign(args) -> list:
    from prefalign.algorithms import onpolicy
    from prefalign.algorithms.grpo import GRPOConfig, run_grpo

    config = GRPOConfig(
        model=args.model, data=args.data, output_dir=tempfile.mkdtemp(), max_steps=args.steps,
        batch_size=args.batch_size, grad_accum=1, num_generations=args.num_generations,
        max_new_tokens=args.completion_length, temperature=1.0, loss_type=args.loss_type,
        beta=args.beta, num_iterations=args.num_iterations, lora_r=args.lora_r,
        lora_dropout=0.0, learning_rate=1e-6, logging_steps=1, seed=0, num_samples=0,
        mixed_precision="no")
    stamps: list = []
    trainer_cls = onpolicy.OnPolicyTrainer
    iteration, sample, step = trainer_cls._train_step, trainer_cls.sample, trainer_cls.step

    def timed_iteration(self):  # one rollout and its updates, as TRL's G optimizer steps
        iteration(self)
        stamps.append(stamp())

    def counted_sample(self, *a, **k):
        rollout = sample(self, *a, **k)
        WORK["completion_tokens"] += sum(int(r["completion_mask"].sum()) for r in rollout.rows)
        return rollout

    def counted_step(self, *a, **k):
        WORK["optimizer_steps"] += 1
        return step(self, *a, **k)

    trainer_cls._train_step, trainer_cls.sample, trainer_cls.step = (
        timed_iteration, timed(counted_sample), counted_step)
    run_grpo(config, scorer=letter_e)
    return stamps


def timed_trl(args) -> list:
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    G = args.num_generations
    stamps: list = []

    class Clock(TrainerCallback):
        """A stamp after every G-th optimizer step: the end of one rollout's updates."""

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step % (G * args.num_iterations) == 0:
                stamps.append(stamp())

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model)
    # prefalign's batch_size B prompts x G samples per rollout, G updates of B completions
    # each per pass: TRL's per-device batch of B completions, G steps per generation.
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, steps_per_generation=G, num_generations=G,
        max_completion_length=args.completion_length, temperature=1.0,
        loss_type=args.loss_type, beta=args.beta, num_iterations=args.num_iterations,
        max_steps=args.steps * G * args.num_iterations, learning_rate=1e-6, logging_steps=1,
        report_to="none", save_strategy="no", seed=0, use_cpu=not torch.cuda.is_available(),
        **trl_speed(args.mode))
    dataset = load_dataset("json", data_files=args.data, split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's notes on CPU settings, every run
        trainer = trl.GRPOTrainer(model=model, reward_funcs=letter_e, args=config,
                                  train_dataset=dataset, processing_class=tokenizer)
        trainer.add_callback(Clock())
        generate = trainer._generate_and_score_completions

        def counted_generate(inputs):  # one call per rollout of B x G completions
            out = generate(inputs)
            WORK["completion_tokens"] += int(out["completion_mask"].sum())
            return out

        trainer._generate_and_score_completions = counted_generate
        trainer._generate_single_turn = timed(trainer._generate_single_turn)
        trainer.train()
    WORK["optimizer_steps"] = trainer.state.global_step
    trainer.save_model(tempfile.mkdtemp())  # prefalign writes OUTPUT/final too
    return stamps


def main() -> None:
    parser = worker_parser(steps=6, warmup=1)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.set_defaults(lora_r=0)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stamps = timed_prefalign(args) if args.mode == "prefalign" else timed_trl(args)
    line = {**json.loads(report(args.mode, stamps, args.warmup)), **WORK, **PHASES}
    if torch.cuda.is_available():
        line["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(line))


if __name__ == "__main__":
    main()
