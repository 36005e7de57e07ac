"""Does torch.compile of the backbone speed up prefalign's DPO step on a CPU?

The bench_dpo.py model and data; DPO.compute_loss + backward + AdamW with a LoRA policy
and its adapters-disabled reference, eager vs `model.base_model.compile()` (inductor),
each in its own process. Reports the first step (compilation), wall steps/s and CPU
seconds per step after warm-up, and the loss difference.

    .venv/bin/python benchmarks/bench_compile.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args) -> None:
    import torch
    from common import stamp, write_model_and_data

    from prefalign.algorithms.dpo import DPO, DPOConfig
    from prefalign.algorithms.reference import AdaptersOff
    from prefalign.data import load_preferences
    from prefalign.logprobs import LogpsModel
    from prefalign.lora import apply_lora
    from prefalign.models import load_causal_lm, load_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    model_dir, data = write_model_and_data(root, args.batch_size * args.steps, 48, 48,
                                           hidden=256, layers=4, vocab=32000)
    tokenizer = load_tokenizer(str(model_dir))
    features, _ = load_preferences(str(data), tokenizer, max_length=256, max_prompt_length=128)
    model = load_causal_lm(str(model_dir))
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32)
    if args.child == "compile":
        model.base_model.compile()  # the backbone; the chunked LM head stays eager
    algorithm = DPO(DPOConfig(model="m", data="d"), tokenizer.pad_token_id, AdaptersOff())
    policy = LogpsModel(model.train())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    start, stamps, losses = time.perf_counter(), [], []
    for step in range(args.steps):
        batch = algorithm.collate(features[step * args.batch_size : (step + 1) * args.batch_size])
        loss, _ = algorithm.compute_loss(policy, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(stamp())
        losses.append(loss.item())
    w, n = args.warmup, args.steps - args.warmup
    print(json.dumps({"first_step_s": stamps[0][0] - start,
                      "steps_per_s": n / (stamps[-1][0] - stamps[w - 1][0]),
                      "cpu_s_per_step": (stamps[-1][1] - stamps[w - 1][1]) / n,
                      "losses": losses, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--child", choices=["eager", "compile"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    results = {}
    for mode in ("eager", "compile"):
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"DPO step, LoRA r=16, batch {args.batch_size} pairs, "
          f"{results['eager']['threads']} thread(s), load average {os.getloadavg()[0]:.2f}")
    print(f"{'mode':<8} {'first step s':>12} {'steps/s':>8} {'CPU s/step':>10}")
    for mode, r in results.items():
        print(f"{mode:<8} {r['first_step_s']:>12.1f} {r['steps_per_s']:>8.3f} "
              f"{r['cpu_s_per_step']:>10.2f}")
    diff = max(abs(a - b) for a, b in zip(results["eager"]["losses"], results["compile"]["losses"]))
    print(f"largest loss difference over {args.steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
