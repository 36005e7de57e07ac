"""Shared set-up for the side-by-side benchmarks: one model, one dataset, child processes.

Each framework runs in its own child process so that its peak memory (max RSS) is its own;
the parent prints both and their ratio. Nothing here is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefalign.tiny import build_model, build_tokenizer

WORDS = ("the a film book song show plot cast scene story music actor ending script was is "
         "felt seemed great good fine dull bad awful slow quick warm cold clever lazy bright "
         "dark long short and but so very quite rather too not").split()


def make_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_model_and_data(root: Path, n_rows: int, prompt_words: int, completion_words: int,
                         hidden: int, layers: int, vocab: int, seed: int = 0) -> tuple[Path, Path]:
    """A Llama-style model of the given size and a JSONL of explicit preference rows."""
    rng = random.Random(seed)
    corpus = [make_text(rng, 30) for _ in range(200)]
    tokenizer = build_tokenizer(corpus, vocab_size=512)
    model = build_model(tokenizer, arch="llama", hidden_size=hidden, num_layers=layers,
                        num_heads=max(1, hidden // 64), seed=seed, vocab_size=vocab)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = root / "prefs.jsonl"
    with data.open("w") as handle:
        for _ in range(n_rows):
            row = {"prompt": make_text(rng, prompt_words),
                   "chosen": " " + make_text(rng, completion_words),
                   "rejected": " " + make_text(rng, rng.randint(completion_words // 2, completion_words))}
            handle.write(json.dumps(row) + "\n")
    return model_dir, data


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `script` in a fresh interpreter (with `env` added to the environment); it
    prints one JSON line of results last."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env={**os.environ, **env} if env else None)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_repeated(script: Path, args: list[str], repeats: int,
                 env: dict[str, str] | None = None) -> dict:
    """Median of `repeats` fresh runs, per numeric field (noise from other jobs on the
    machine moves single runs); `runs` and `cpu_runs` keep every run's steps/s and CPU
    seconds per step."""
    runs = [run_child(script, args, env) for _ in range(repeats)]
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = [round(r["steps_per_s"], 4) for r in runs]
    out["cpu_runs"] = [round(r["cpu_s_per_step"], 4) for r in runs]
    return out


def tokens_per_pair(model_dir: Path, data: Path, max_length: int) -> float:
    """Mean real (non-padding) tokens of prompt+chosen plus prompt+rejected per pair, after
    truncation: the work both frameworks do per pair (they tokenize identically)."""
    from prefalign.data import load_preferences
    from prefalign.models import load_tokenizer

    features, _ = load_preferences(str(data), load_tokenizer(str(model_dir)),
                                   max_length=max_length, max_prompt_length=max_length // 2)
    total = sum(2 * len(f["prompt_input_ids"]) + len(f["chosen_input_ids"])
                + len(f["rejected_input_ids"]) for f in features)
    return total / len(features)


def load_average() -> float:
    """1-minute load average: above the core count, other jobs share the CPU."""
    return round(os.getloadavg()[0], 2)


def stamp() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): CPU time is the steadier measure when
    other jobs share the machine."""
    return time.perf_counter(), time.process_time()


def trl_clock(stamps: list[tuple[float, float]]):
    """A transformers TrainerCallback appending a stamp() at the end of every step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            stamps.clear()

        def on_step_end(self, *args, **kwargs):
            stamps.append(stamp())

    return Clock()


def prefalign_clock(stamps: list[tuple[float, float]]) -> None:
    """Append a stamp() after every training step of prefalign's loops, the offline one and
    the on-policy one (whose step is one rollout and its updates), in this process only."""
    from prefalign.algorithms.onpolicy import OnPolicyTrainer
    from prefalign.train.loop import Trainer

    for cls in (Trainer, OnPolicyTrainer):
        step = cls.__dict__["_train_step"]

        def timed(self, *args, _step=step, **kwargs):
            out = _step(self, *args, **kwargs)
            stamps.append(stamp())
            return out

        cls._train_step = timed


def report(mode: str, stamps: list[tuple[float, float]], warmup: int) -> str:
    """The worker's last line: steps/s (wall) and CPU seconds per step after `warmup`
    steps, torch's thread count, and this process's peak RSS."""
    import torch

    measured = len(stamps) - warmup
    wall = stamps[-1][0] - stamps[warmup - 1][0]
    cpu = stamps[-1][1] - stamps[warmup - 1][1]
    return json.dumps({"mode": mode, "steps_per_s": measured / wall, "seconds": wall,
                       "cpu_s_per_step": cpu / measured, "measured_steps": measured,
                       "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb()})


# -- the side-by-side drivers (bench_dpo, bench_reward, bench_ppo) ----------------------

TRL_MODES = ("trl-fast", "trl-default")


def driver_parser(description: str, modes: str, steps: int) -> argparse.ArgumentParser:
    """The options every side-by-side driver takes: model size, steps, modes, repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--modes", default=modes)
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per mode (median)")
    parser.add_argument("--threads", type=int, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--json", help="also write the results here")
    return parser


def add_pair_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of the preference-pair drivers (DPO, reward)."""
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--completion-words", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16, help="0 = full fine-tuning")
    return parser


def worker_args(mode: str, variants: dict[str, list[str]]) -> list[str]:
    """'prefalign+shared' -> ['prefalign', '--prefix-sharing'] with variants
    {"shared": ["--prefix-sharing"]}; TRL modes take none."""
    name, *chosen = mode.split("+")
    if chosen and name != "prefalign":
        raise SystemExit(f"only prefalign takes variants, got {mode!r}")
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: use {sorted(variants)}")
    return [name] + [flag for v in chosen for flag in variants[v]]


def run_pair_benchmark(args, worker: Path, name: str, variants: dict[str, list[str]],
                       extra: list[str] = (), note: str = "") -> None:
    """Build the model and pairs, run every mode of args.modes through `worker`, print
    the table and the ratios (and write args.json)."""
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in each child
    root = Path(tempfile.mkdtemp(prefix=f"bench-{worker.stem}-"))
    model, data = write_model_and_data(root, n_rows=args.batch_size * (args.steps + 2),
                                       prompt_words=args.prompt_words,
                                       completion_words=args.completion_words,
                                       hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    per_pair = tokens_per_pair(model, data, args.max_length)
    common = ["--model", str(model), "--data", str(data), "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
              "--lora-r", str(args.lora_r), *extra]
    load_before = load_average()
    results = {mode: run_repeated(worker, [*worker_args(mode, variants), *common], args.repeats)
               for mode in args.modes.split(",")}
    setting = (f"{name}, Llama-style hidden={args.hidden} layers={args.layers} "
               f"vocab={args.vocab}, batch {args.batch_size} pairs, max_length "
               f"{args.max_length}, {per_pair:.0f} tokens per pair, "
               f"{'LoRA r=' + str(args.lora_r) if args.lora_r else 'full fine-tuning'}{note}")
    for r in results.values():
        r["pairs_per_s"] = r["steps_per_s"] * args.batch_size
        r["tokens_per_s"] = r["pairs_per_s"] * per_pair
    print_results(args, setting, results, load_before, ("pairs/s", "tokens/s"))


def print_results(args, setting: str, results: dict[str, dict], load_before: float,
                  columns: tuple[str, ...]) -> None:
    """The table (steps/s, the `columns` keys with '/' read as '_per_', CPU s/step, peak
    RSS), every prefalign mode's ratios to every TRL mode, and args.json when given."""
    print(setting)
    threads = next(iter(results.values()))["threads"]
    print(f"load average before {load_before}, after {load_average()}; {threads} thread(s); "
          f"median of {args.repeats} run(s)")
    keys = [c.replace("/", "_per_") for c in columns]
    print(f"{'mode':<24} {'steps/s':>8} " + " ".join(f"{c:>10}" for c in columns)
          + f" {'CPU s/step':>10} {'peak RSS MB':>12}")
    for mode, r in results.items():
        print(f"{mode:<24} {r['steps_per_s']:>8.3f} " + " ".join(f"{r[k]:>10.2f}" for k in keys)
              + f" {r['cpu_s_per_step']:>10.2f} {r['peak_rss_mb']:>12.0f}")
    for ours in (m for m in results if m.startswith("prefalign")):
        for theirs in (m for m in TRL_MODES if m in results):
            a, b = results[ours], results[theirs]
            print(f"{ours} / {theirs}: throughput x{a['steps_per_s'] / b['steps_per_s']:.2f} "
                  f"(CPU time x{b['cpu_s_per_step'] / a['cpu_s_per_step']:.2f}), "
                  f"peak memory x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": setting, "args": vars(args),
                                               "results": results}, indent=2) + "\n")


# -- the workers -----------------------------------------------------------------------


def worker_parser(steps: int = 20, warmup: int = 3) -> argparse.ArgumentParser:
    """The arguments every worker takes; a worker adds its own."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["prefalign", *TRL_MODES])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=16)
    return parser


def run_worker(args, timed_prefalign, timed_trl) -> None:
    """Run one framework and print the report() line the driver reads."""
    import torch

    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stamps = timed_prefalign(args) if args.mode == "prefalign" else timed_trl(args)
    print(report(args.mode, stamps, args.warmup))


def trl_speed(mode: str) -> dict:
    """TRL's defaults are bf16 autocast and gradient checkpointing; on a CPU both are
    slower, so "trl-fast" turns them off."""
    return {"bf16": False, "gradient_checkpointing": False} if mode == "trl-fast" else {}


def peft_lora(r: int, task_type: str):
    """The LoRA both frameworks train: rank r, alpha 2r, no dropout, on q/k/v/o."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type=task_type,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def train_trl(trainer_cls, data: str, **kwargs) -> list:
    """Train a TRL trainer on the JSONL `data` (other arguments as the trainer takes them);
    returns a stamp() per step."""
    import warnings

    from datasets import load_dataset

    stamps: list = []
    dataset = load_dataset("json", data_files=data, split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's notes on CPU settings, every run
        trainer = trainer_cls(train_dataset=dataset, **kwargs)
        trainer.add_callback(trl_clock(stamps))
        trainer.train()
    return stamps
