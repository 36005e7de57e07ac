"""PPO step throughput and peak memory: prefalign vs TRL's PPOTrainer.

Same Llama-style policy, a reward model of the same shape (random score head), the same
prompts, batch size, response length and PPO settings for both: a separate critic
initialised from the reward model, 4 PPO epochs of one mini-batch per rollout, temperature
0.7, kl_coef 0.05, full fine-tuning. A step is one rollout batch and its updates.

TRL removed PPOTrainer after 0.23; the peer runs from a side install that takes
precedence over the venv's TRL in its child process only:

    .venv/bin/pip install --no-deps --target benchmarks/.peers/trl-0.23 trl==0.23.0
    .venv/bin/python benchmarks/bench_ppo.py --trl-path benchmarks/.peers/trl-0.23
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common import (
    driver_parser,
    load_average,
    print_results,
    run_repeated,
    write_model_and_data,
)

HERE = Path(__file__).resolve().parent


def write_reward_model(model_dir: Path, out: Path) -> Path:
    """A sequence-classification model on model_dir's config (one label), with its
    tokenizer: the reward model and the critic's initialisation for both frameworks."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = driver_parser(__doc__.splitlines()[0], "prefalign,trl-fast,trl-default", steps=8)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--trl-path", help="directory holding a TRL that has PPOTrainer")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in each child
    root = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    model, data = write_model_and_data(root, n_rows=args.batch_size * (args.steps + 2),
                                       prompt_words=args.prompt_words, completion_words=4,
                                       hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    reward = write_reward_model(model, root / "reward")
    common = ["--model", str(model), "--reward-model", str(reward), "--data", str(data),
              "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch-size", str(args.batch_size), "--response-length", str(args.response_length)]
    peer = {}
    if args.trl_path:
        peer = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(args.trl_path).resolve()),
                                                           os.environ.get("PYTHONPATH")]))}
    load_before = load_average()
    results = {mode: run_repeated(HERE / "ppo_worker.py", [mode, *common], args.repeats,
                                  peer if mode.startswith("trl") else None)
               for mode in args.modes.split(",")}
    for r in results.values():
        r["episodes_per_s"] = r["steps_per_s"] * args.batch_size
    setting = (f"PPO, Llama-style hidden={args.hidden} layers={args.layers} vocab={args.vocab}, "
               f"{args.batch_size} prompts of {args.prompt_words} words per step, "
               f"{args.response_length}-token responses, 4 PPO epochs, separate critic, "
               f"full fine-tuning")
    print_results(args, setting, results, load_before, ("episodes/s",))


if __name__ == "__main__":
    main()
