"""Two steps of the GPU check that are not side-by-side trainer benchmarks (see gpu_check.py).

    python benchmarks/gpu_steps.py fsdp --out DIR [--dry]
    python benchmarks/gpu_steps.py memory --out DIR [--dry]

Each writes DIR/<step>.json. `--dry` uses tiny shapes on the CPU and skips what needs CUDA.

fsdp: the same full fine-tuning DPO run, 4 steps, once as a plain one-GPU process and once
under `accelerate launch` with configs/accelerate/fsdp_full_shard.yaml on 1 process; the
per-step loss and gradient norm of the two must agree (bf16 autocast in both, so to about
1e-2, not bit for bit). Both write a checkpoint at the last step (FSDP: sharded, through
accelerate's save_state) and the final model (FSDP: gathered from the shards).

memory: peak CUDA memory of one forward+backward of the completion log-probs of 8 rows
(4 pairs; the second half of each row is completion) through a one-layer Qwen2-shaped model
(hidden 896) against sequence length and vocabulary, for prefalign's chunked LM head
(chunk 1024 rows), its unchunked head, and TRL's path (full logits, then TRL's
selective_log_softmax). An out-of-memory error is a result ("OOM"), not a failure.
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
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_full_shard.yaml"
FSDP_TOLERANCE = 1e-2
FSDP_STEPS = 4


# -- fsdp -------------------------------------------------------------------------------


def _dpo_command(model: Path, data: Path, out: Path, cuda: bool) -> list[str]:
    return ["-m", "prefalign.cli", "dpo", "--model", str(model), "--data", str(data),
            "--output-dir", str(out), "--max-steps", str(FSDP_STEPS), "--batch-size", "2",
            "--grad-accum", "1", "--lora-r", "0", "--learning-rate", "1e-4",
            "--lr-scheduler", "constant", "--warmup-ratio", "0", "--logging-steps", "1",
            "--max-length", "256", "--max-prompt-length", "128", "--seed", "0",
            "--save-steps", str(FSDP_STEPS),  # a checkpoint: FSDP's sharded save_state
            "--mixed-precision", "bf16" if cuda else "no"]


def _run(cmd: list[str], log: list[str]) -> str | None:
    """Run `cmd`; None when it succeeded, else "exit N: its last line of output"."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.append(f"$ {' '.join(cmd)}\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    if proc.returncode == 0:
        return None
    lines = [x for x in (proc.stdout + proc.stderr).strip().splitlines() if x.strip()]
    return f"exit {proc.returncode}: {(lines or [''])[-1][:300]}"


def _per_step(out: Path) -> dict[str, list[float]]:
    from prefalign.train.metrics import read_metrics

    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    return {k: [r[k] for r in records] for k in ("loss", "grad_norm", "rewards/margins")}


def fsdp_step(dry: bool, out_dir: Path) -> dict:
    import torch
    from bench_gpu_dpo import QWEN2_05B, SMOKE, write_setup

    cuda = torch.cuda.is_available() and not dry
    shape = dict(QWEN2_05B, num_hidden_layers=4) if cuda else SMOKE
    root = Path(tempfile.mkdtemp(prefix="gpu-check-fsdp-"))
    model, data = write_setup(root, shape, n_rows=2 * FSDP_STEPS, max_length=256)
    log: list[str] = []
    result: dict = {"steps": FSDP_STEPS, "tolerance": FSDP_TOLERANCE,
                    "model": "Qwen2 shapes, 4 layers" if cuda else "tiny (dry)"}
    plain = root / "plain"
    error = _run([sys.executable, *_dpo_command(model, data, plain, cuda)], log)
    result["plain"] = {"error": error} if error else _per_step(plain)
    if not cuda:
        result["fsdp"] = "skipped: no CUDA"
    else:
        sharded = root / "fsdp"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(FSDP_CONFIG), "--num_processes", "1"]
        error = _run([*launch, *_dpo_command(model, data, sharded, cuda)], log)
        result["fsdp"] = {"error": error} if error else _per_step(sharded)
    (out_dir / "fsdp.log").write_text("\n\n".join(log))
    if isinstance(result["fsdp"], dict) and "loss" in result["fsdp"] and "loss" in result["plain"]:
        diffs = {k: max((abs(a - b) for a, b in zip(result["plain"][k], result["fsdp"][k])),
                        default=None) for k in result["plain"]}
        result["max_abs_diff"] = diffs
        result["equal"] = all(d is not None and d <= FSDP_TOLERANCE for d in diffs.values())
    return result


# -- memory -----------------------------------------------------------------------------


def _tiny_qwen(vocab: int, hidden: int, device: str):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    heads = 14 if hidden == 896 else 4
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=2, intermediate_size=4864 if hidden == 896 else 2 * hidden,
                         vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=1 << 15)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)


def _logps(path: str, model, ids, attention, completion):
    """Per-row sums of completion log-probs by one of the three paths."""
    from prefalign.logprobs import completion_logps

    if path == "trl":
        from trl.trainer.utils import selective_log_softmax

        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        token = selective_log_softmax(logits[:, :-1], ids[:, 1:])
        mask = completion[:, 1:]
        return (token * mask).sum(-1)
    chunk = 1024 if path == "prefalign-chunked" else None
    return completion_logps(model, ids, attention, completion, chunk_size=chunk).logps


def memory_point(path: str, model, rows: int, length: int, device: str) -> dict:
    import torch

    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=generator).to(device)
    attention = torch.ones_like(ids, dtype=torch.bool)
    completion = torch.zeros_like(attention)
    completion[:, length // 2 :] = True
    model.zero_grad(set_to_none=True)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    try:
        logps = _logps(path, model, ids, attention, completion)
        logps.float().sum().backward()
        if cuda:
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return {"peak_gb": "OOM"}
    except RuntimeError as error:  # one broken point must not lose the others
        model.zero_grad(set_to_none=True)
        return {"peak_gb": None, "error": str(error).splitlines()[0][:300]}
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return {"peak_gb": peak, "seconds": round(seconds, 4),
            "logps": [round(x, 3) for x in logps.detach().float().tolist()]}


def memory_step(dry: bool, out_dir: Path) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not dry
    device = "cuda" if cuda else "cpu"
    lengths, vocabs, hidden = ((1024, 4096, 16384), (32000, 151936), 896) if cuda else (
        (32, 64), (256, 512), 64)
    paths = ("prefalign-chunked", "prefalign", "trl")
    points = []
    result = {"rows": 8, "hidden": hidden, "layers": 1, "device": device,
              "peak_memory": "max allocated minus before" if cuda else "skipped: no CUDA",
              "points": points}
    for vocab in vocabs:
        model = _tiny_qwen(vocab, hidden, device)
        for length in lengths:
            for path in paths:
                try:
                    point = memory_point(path, model, 8, length, device)
                except ImportError as error:  # TRL missing: the other paths still count
                    point = {"peak_gb": None, "error": str(error)}
                points.append({"path": path, "vocab": vocab, "length": length, **point})
                print(json.dumps(points[-1])[:300], flush=True)
                # Written after every point: a time-out keeps the points measured so far.
                (out_dir / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
        del model
        if cuda:
            torch.cuda.empty_cache()
    # The three paths compute the same numbers: their largest disagreement per point.
    for vocab in vocabs:
        for length in lengths:
            same = [p["logps"] for p in points
                    if p["vocab"] == vocab and p["length"] == length and "logps" in p]
            if len(same) > 1:
                gap = max(abs(a - b) for other in same[1:] for a, b in zip(same[0], other))
                for p in points:
                    if p["vocab"] == vocab and p["length"] == length:
                        p["max_logps_gap"] = round(gap, 4)
    for p in points:
        p.pop("logps", None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("fsdp", "memory"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = fsdp_step if args.step == "fsdp" else memory_step
    result = run(args.dry, out)
    (out / f"{args.step}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result)[:2000])
    errors = [f"{k}: {v['error']}" for k, v in result.items() if isinstance(v, dict) and "error" in v]
    if errors:
        raise SystemExit("; ".join(errors))


if __name__ == "__main__":
    main()
