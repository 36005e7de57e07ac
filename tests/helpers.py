"""Data builders shared by the tests."""

import json
import random


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable preference task: chosen praises, rejected complains, prompts vary."""
    rng = random.Random(seed)
    subjects = ["The film", "This book", "The meal", "Our trip", "The show", "My day", "The song"]
    good = ["was great fun.", "is excellent.", "felt wonderful.", "was lovely.", "is superb."]
    bad = ["was awful.", "is terrible.", "felt boring.", "was dreadful.", "is poor."]
    return [
        {"prompt": f"{rng.choice(subjects)} {i % 10}:", "chosen": " " + rng.choice(good),
         "rejected": " " + rng.choice(bad)}
        for i in range(n)
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)
