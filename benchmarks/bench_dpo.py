"""DPO step throughput and peak memory: prefalign vs TRL's DPOTrainer, side by side.

Same Llama-style model, data, batch size, max length and LoRA rank for both; TRL runs with
its fastest CPU settings (bf16 and gradient checkpointing off) and with its defaults.
prefalign variants add its options with '+': `prefalign+shared` (--prefix-sharing),
`prefalign+chunk` (--logps-chunk-size 256), e.g. `prefalign+shared+chunk`.

    .venv/bin/python benchmarks/bench_dpo.py            # prints a table and the ratios
    .venv/bin/python benchmarks/bench_dpo.py --modes prefalign,prefalign+shared,trl-fast \\
        --repeats 3 --json dpo.json

tokens/s counts the real (non-padding) tokens of prompt+chosen and prompt+rejected per
pair, the same for both frameworks; medians of --repeats fresh processes are shown.
"""

from __future__ import annotations

from pathlib import Path

from common import add_pair_options, driver_parser, run_pair_benchmark

HERE = Path(__file__).resolve().parent
VARIANTS = {"shared": ["--prefix-sharing"], "chunk": ["--chunk-size", "256"]}


def main() -> None:
    parser = add_pair_options(driver_parser(
        __doc__.splitlines()[0], "prefalign,prefalign+shared,trl-fast,trl-default", steps=20))
    parser.add_argument("--precompute-ref", action="store_true")
    args = parser.parse_args()
    run_pair_benchmark(args, HERE / "dpo_worker.py", "DPO", VARIANTS,
                       extra=["--precompute-ref"] if args.precompute_ref else [],
                       note=", precomputed reference" if args.precompute_ref else "")


if __name__ == "__main__":
    main()
