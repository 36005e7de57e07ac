"""Shared set-up for the side-by-side benchmarks: one model, one dataset, child processes.

Each framework runs in its own child process so that its peak memory (max RSS) is its own;
the parent prints both and their ratio. Nothing here is downloaded.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
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


def run_child(script: Path, args: list[str]) -> dict:
    """Run `script` in a fresh interpreter; it prints one JSON line of results last."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
