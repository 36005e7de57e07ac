"""GRPO step throughput and peak memory: prefalign vs TRL's GRPOTrainer (no vLLM on either).

Same Llama-style policy, prompts, reward function (grpo_worker.letter_e, in TRL's
signature), G, completion length and GRPO settings for both, full fine-tuning. An
iteration is one rollout of B prompts x G completions and its updates: prefalign's
`batch_size` B, G optimizer updates of B completions per pass; TRL's
per_device_train_batch_size B with steps_per_generation G, so G of TRL's optimizer steps.
Throughput is counted after the warm-up iterations; every figure is the median over
repeats that alternate the modes (A B A B ...), so both share the machine's drift.

Equal work is enforced: the policy can never sample EOS (see `forbid_eos`), so every
completion has exactly --completion-length tokens on both sides, and the script stops if
the two sides' optimizer steps, completions scored or completion tokens differ.

    .venv/bin/python benchmarks/bench_grpo.py --steps 6 --repeats 3
    .venv/bin/python benchmarks/bench_grpo.py --root DIR --print-commands   # whole process
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from common import (
    TRL_MODES,
    driver_parser,
    load_average,
    make_text,
    run_child,
    write_model_and_data,
)

HERE = Path(__file__).resolve().parent
WORK_KEYS = ("optimizer_steps", "completions", "completion_tokens")


def forbid_eos(model_dir: Path) -> float:
    """Make EOS unsampleable, so that every completion runs to the length limit in both
    frameworks: hidden dimension 0 of every token embedding becomes a large constant, which
    keeps the final norm's dimension 0 large and positive, and the LM head row of EOS reads
    it with a large negative weight. Returns the largest log-probability of EOS on a test
    batch (far below fp32's smallest probability, so a sampler can never pick it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 10.0
        head = model.get_output_embeddings().weight
        head[eos] = 0.0
        head[eos, 0] = -50.0
        ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
        worst = model(input_ids=ids).logits.log_softmax(-1)[..., eos].max().item()
    if worst > -200:
        raise SystemExit(f"EOS log-probability {worst:.1f}: completions could end early")
    model.save_pretrained(model_dir)
    return worst


def setup(root: Path, args) -> tuple[Path, Path]:
    """The model (EOS-free) and a JSONL of prompts under root; reused when present."""
    model, prompts = root / "model", root / "prompts.jsonl"
    if (model / "config.json").exists() and prompts.exists():
        return model, prompts
    import random

    model, _ = write_model_and_data(root, n_rows=1, prompt_words=1, completion_words=1,
                                    hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    print(f"EOS log-probability at most {forbid_eos(model):.0f} (never sampled)")
    rng = random.Random(0)
    with prompts.open("w") as handle:
        for _ in range(args.batch_size * (args.steps + 2)):
            handle.write(json.dumps({"prompt": make_text(rng, args.prompt_words)}) + "\n")
    return model, prompts


def worker_command(mode: str, model: Path, prompts: Path, args) -> list[str]:
    return [sys.executable, str(HERE / "grpo_worker.py"), mode, "--model", str(model),
            "--data", str(prompts), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--num-generations", str(args.num_generations),
            "--completion-length", str(args.completion_length), "--loss-type", args.loss_type,
            "--beta", str(args.beta), "--num-iterations", str(args.num_iterations)]


def run_alternating(modes: list[str], commands: dict[str, list[str]], repeats: int) -> dict:
    """`repeats` rounds of every mode in turn (A B A B ...); per mode the median of each
    numeric field and every run's figures; pairwise ratios are taken per round."""
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for round_ in range(repeats):
        for mode in modes:
            cmd = commands[mode]
            runs[mode].append(run_child(Path(cmd[1]), cmd[2:]))
            r = runs[mode][-1]
            print(f"round {round_ + 1} {mode}: {r['steps_per_s']:.4f} it/s, "
                  f"{r['cpu_s_per_step']:.2f} CPU s/it, {r['peak_rss_mb']:.0f} MB, "
                  + ", ".join(f"{k} {r[k]}" for k in WORK_KEYS), flush=True)
    out = {}
    for mode, rs in runs.items():
        out[mode] = {k: statistics.median(r[k] for r in rs) for k, v in rs[0].items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[mode]["runs"] = rs
    return out


def check_same_work(results: dict) -> None:
    """Every run of every mode did the same work (steps, completions, tokens)."""
    seen = {(m, k): {r[k] for r in res["runs"]} for m, res in results.items() for k in WORK_KEYS}
    for key in WORK_KEYS:
        values = set().union(*(seen[m, key] for m in results))
        if len(values) != 1:
            raise SystemExit(f"the modes did different work: {key} {sorted(values)} "
                             f"({ {m: sorted(seen[m, key]) for m in results} })")


def print_results(args, results: dict, load_before: float) -> None:
    per_it = args.batch_size * args.num_generations
    print(f"GRPO, Llama-style hidden={args.hidden} layers={args.layers} vocab={args.vocab}, "
          f"{args.batch_size} prompts of {args.prompt_words} words x G={args.num_generations}, "
          f"{args.completion_length}-token completions (no EOS), loss_type={args.loss_type}, "
          f"beta={args.beta}, num_iterations={args.num_iterations}, full fine-tuning; "
          f"{args.steps - args.warmup} iterations timed after {args.warmup}")
    print(f"load average before {load_before}, after {load_average()}; "
          f"{next(iter(results.values()))['runs'][0]['threads']} thread(s); median of {args.repeats} "
          f"alternating run(s)")
    print(f"{'mode':<14} {'it/s':>7} {'compl/s':>8} {'CPU s/it':>9} {'peak RSS MB':>12}"
          f" {'CUDA peak MB':>12}  work (steps, completions, tokens)")
    for mode, r in results.items():
        if "cuda_peak_mb" in r:
            r["cuda_peak_mb"] = round(r["cuda_peak_mb"])
        print(f"{mode:<14} {r['steps_per_s']:>7.3f} {r['steps_per_s'] * per_it:>8.2f} "
              f"{r['cpu_s_per_step']:>9.2f} {r['peak_rss_mb']:>12.0f} "
              f"{r['cuda_peak_mb'] if 'cuda_peak_mb' in r else '-':>12}  "
              + ", ".join(str(r['runs'][0][k]) for k in WORK_KEYS))
    for theirs in (m for m in TRL_MODES if m in results and "prefalign" in results):
        a, b = results["prefalign"]["runs"], results[theirs]["runs"]
        pairs = sorted(x["steps_per_s"] / y["steps_per_s"] for x, y in zip(a, b))
        cpu = sorted(y["cpu_s_per_step"] / x["cpu_s_per_step"] for x, y in zip(a, b))
        mem = results["prefalign"]["peak_rss_mb"] / results[theirs]["peak_rss_mb"]
        line = (f"prefalign / {theirs}: throughput x{statistics.median(pairs):.2f} "
                f"(pairs {', '.join(f'{p:.2f}' for p in pairs)}), CPU time "
                f"x{statistics.median(cpu):.2f}, peak RSS x{mem:.2f}")
        if "cuda_peak_mb" in results["prefalign"]:
            line += (f", CUDA peak x"
                     f"{results['prefalign']['cuda_peak_mb'] / results[theirs]['cuda_peak_mb']:.2f}")
        print(line)


def main() -> None:
    parser = driver_parser(__doc__.splitlines()[0], "prefalign,trl-fast", steps=6)
    parser.set_defaults(vocab=32000)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="iterations not timed, first")
    parser.add_argument("--root", type=Path, help="model and prompts here (kept, reused)")
    parser.add_argument("--print-commands", action="store_true",
                        help="print each mode's worker command (for whole-process timing)")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("need 1 <= --warmup < --steps")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in each child
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    root.mkdir(parents=True, exist_ok=True)
    model, prompts = setup(root, args)
    modes = args.modes.split(",")
    commands = {m: worker_command(m, model, prompts, args) for m in modes}
    if args.print_commands:
        for cmd in commands.values():
            print(shlex.join(cmd))
        return
    load_before = load_average()
    results = run_alternating(modes, commands, args.repeats)
    check_same_work(results)
    print_results(args, results, load_before)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results},
                                              indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
