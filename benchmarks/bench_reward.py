"""Reward-model training throughput and peak memory: prefalign vs TRL's RewardTrainer.

Same Llama-style backbone, preference data, batch size, max length and LoRA rank; TRL runs
with its fastest CPU settings (bf16 and gradient checkpointing off) and with its defaults.
`prefalign+shared` runs prefalign with --prefix-sharing ([prompt | chosen | rejected] rows).

    .venv/bin/python benchmarks/bench_reward.py --repeats 3
"""

from __future__ import annotations

from pathlib import Path

from common import add_pair_options, driver_parser, run_pair_benchmark

HERE = Path(__file__).resolve().parent
VARIANTS = {"shared": ["--prefix-sharing"]}


def main() -> None:
    parser = add_pair_options(driver_parser(
        __doc__.splitlines()[0], "prefalign,prefalign+shared,trl-fast,trl-default", steps=20))
    run_pair_benchmark(parser.parse_args(), HERE / "reward_worker.py", "Reward model", VARIANTS)


if __name__ == "__main__":
    main()
