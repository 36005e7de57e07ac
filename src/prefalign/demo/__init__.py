"""`prefalign demo`: the pipeline that exists so far, on a built-in task, offline.

Builds a tiny tokenizer and Llama-style model locally, writes a small preference set
(positive vs negative continuations of review openings), checks it, and trains DPO with
LoRA on it, printing where every artifact went.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from prefalign.algorithms.dpo import DPOConfig, run_dpo
from prefalign.data import check_file
from prefalign.tiny import build_model, build_tokenizer

OPENINGS = ["The film", "This novel", "The soundtrack", "The acting", "The ending", "The plot",
            "The director's new work", "The second season", "The cast", "The script"]
POSITIVE = ["was a joy to watch.", "is brilliant and moving.", "felt warm and clever.",
            "was wonderful from start to finish.", "is a superb piece of work."]
NEGATIVE = ["was a chore to sit through.", "is dull and clumsy.", "felt cold and lazy.",
            "was awful from start to finish.", "is a disappointing mess."]


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Review {i}: {rng.choice(OPENINGS)}",
             "chosen": " " + rng.choice(POSITIVE), "rejected": " " + rng.choice(NEGATIVE)}
            for i in range(n)]


def run_demo(output_dir: str = "demo-output", quick: bool = False, seed: int = 0) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] building a tiny tokenizer and Llama-style model in {out / 'base'}")
    corpus = [f"{o} {p}" for o in OPENINGS for p in POSITIVE + NEGATIVE]
    tokenizer = build_tokenizer(corpus, vocab_size=512)
    model = build_model(tokenizer, arch="llama", hidden_size=64, num_layers=2, seed=seed)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")

    pairs = out / "prefs.jsonl"
    print(f"[2/4] writing preference pairs to {pairs}")
    rows = preference_pairs(64 if quick else 256, seed)
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    print("[3/4] checking the data")
    print(check_file(str(pairs), tokenizer=tokenizer).format())

    print("[4/4] DPO with LoRA (reference = the same weights with adapters disabled)")
    config = DPOConfig(model=str(out / "base"), data=str(pairs), output_dir=str(out / "dpo"),
                       max_steps=20 if quick else 60, batch_size=8, grad_accum=1,
                       learning_rate=5e-3, lr_scheduler="constant", lora_r=8, beta=0.1,
                       logging_steps=5, seed=seed)
    result = run_dpo(config)
    first, last = result.history[0], result.history[-1]
    print(f"DPO: loss {first['loss']:.3f} -> {last['loss']:.3f}, reward accuracy "
          f"{first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}, "
          f"margin {first['rewards/margins']:.3f} -> {last['rewards/margins']:.3f}")
    print(f"adapter: {out / 'dpo' / 'final'}; metrics: {out / 'dpo' / 'metrics.jsonl'}")
    return out
