"""`prefalign score`: a reward model's scores of every row of a data file, written as JSONL."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from prefalign.data.formats import DroppedRow, normalize_row
from prefalign.data.sources import load_rows
from prefalign.data.tokenize import tokenize_preferences
from prefalign.data.unpaired import normalize_unpaired_row
from prefalign.errors import DataError, atomic_file, writing
from prefalign.scoring.reward_model import RewardScorer, pair_sequences

RESPONSE_KEYS = ("response", "completion", "messages")  # single-response rows, in this order
SCORE_KEYS = ("score_chosen", "score_rejected", "score")


def score_file(reward_model_dir: str | Path, data: Any, output: str | Path | None = None,
               batch_size: int = 8, max_length: int | None = 1024,
               max_prompt_length: int | None = 512, trust_remote_code: bool = False,
               chat_template: str | None = None, text_as_chat: bool = False) -> Path:
    """Score every row of `data` and write the rows with their scores as JSONL -> the path.

    Preference rows (chosen/rejected, any format data.formats reads) get `score_chosen` and
    `score_rejected`; rows with a prompt and a `response` (or `completion`), or a whole
    conversation in `messages`, get `score`. Ids are rendered and truncated as in training
    (same max_length / max_prompt_length), so a pair's score_chosen is its training-time
    r_c. A pair that training would drop (e.g. chosen == rejected) is written with null
    scores and counted. output defaults to DATA.scored.jsonl beside the data file.
    chat_template, text_as_chat: as in training (data.chat).
    """
    from prefalign.data.chat import tokens_line

    scorer = RewardScorer(reward_model_dir, batch_size=batch_size, max_length=max_length,
                          max_prompt_length=max_prompt_length, trust_remote_code=trust_remote_code,
                          chat_template=chat_template, text_as_chat=text_as_chat)
    print(tokens_line(scorer.tokenizer))
    rows = load_rows(data)
    out_rows, pairs, singles, dropped = _sort_rows(rows)
    sequences = []
    if pairs:
        features, _ = tokenize_preferences([e for _, e in pairs], scorer.tokenizer, max_length,
                                           max_prompt_length)
        sequences += pair_sequences(features)
    sequences += scorer.tokenize([e for _, e in singles]) if singles else []
    scores = scorer.score_ids(sequences)  # every chosen, every rejected, every single
    n = len(pairs)
    for k, (i, _) in enumerate(pairs):
        out_rows[i].update(score_chosen=scores[k], score_rejected=scores[n + k])
    for k, (i, _) in enumerate(singles):
        out_rows[i]["score"] = scores[2 * n + k]
    path = Path(output) if output else _default_output(data)
    _write_rows(path, out_rows, [origin for _, origin in rows])
    note = f", {sum(dropped.values())} pairs not scored ({dict(dropped)})" if dropped else ""
    print(f"scored {len(rows)} rows ({n} pairs, {len(singles)} responses){note} -> {path}")
    return path


def _sort_rows(rows: list) -> tuple[list, list, list, Counter]:
    """(output rows, [(index, pair example)], [(index, single example)], dropped reasons).
    A pair that training would drop keeps null scores in the output."""
    out_rows = [dict(r.data) if isinstance(r.data, dict) else r.data for r in rows]
    pairs, singles, dropped = [], [], Counter()
    for i, (row, origin) in enumerate(rows):
        if isinstance(row, dict) and "chosen" in row and "rejected" in row:
            try:
                pairs.append((i, normalize_row(row, origin)))
            except DroppedRow as drop:
                dropped[drop.reason] += 1
                out_rows[i].update(score_chosen=None, score_rejected=None)
        elif isinstance(row, dict):
            singles.append((i, _single_example(row, origin)))
        else:
            raise DataError(f"{origin}: expected an object, got {type(row).__name__}")
    return out_rows, pairs, singles, dropped


def _single_example(data: dict, origin: str) -> dict:
    key = next((k for k in RESPONSE_KEYS if data.get(k) is not None), None)
    if key is None:
        raise DataError(f"{origin}: nothing to score: give chosen/rejected, or a response "
                        f"({', '.join(RESPONSE_KEYS)}) with its prompt")
    return normalize_unpaired_row({"prompt": data.get("prompt"), "completion": data[key],
                                   "label": True}, origin)


def _default_output(data: Any) -> Path:
    path = Path(str(data))
    if path.is_file():
        return path.with_name(path.stem + ".scored.jsonl")
    return Path(path.name + ".scored.jsonl")


def _write_rows(path: Path, rows: list[dict], origins: list[str]) -> None:
    with writing(path, flag="--output"):
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", flag="--output") as handle:  # whole file or none
        for row, origin in zip(rows, origins):
            try:  # allow_nan=False: NaN and Infinity are not JSON; no reader takes them
                line = json.dumps(row, ensure_ascii=False, default=str, allow_nan=False)
            except ValueError:
                raise DataError(f"{origin}: a score or value is NaN or infinite, which JSON "
                                "cannot hold; check the row and the reward model's weights "
                                f"(scores: {[row.get(k) for k in SCORE_KEYS if k in row]})"
                                ) from None
            handle.write(line + "\n")
