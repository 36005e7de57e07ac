"""Pairwise judging for `evaluate`: each model's response against the baseline's, both orders.

Sample (prompt i, candidate j) of a model is put to the judge next to the baseline's sample
(i, j) twice: the model's response shown first, then shown second, each as a ranking of two
candidates (preferences.judge's template and parser, so a local LM and an OpenAI-compatible
endpoint ask and parse alike; an unparsable answer is asked again up to `retries` times).
The pair's verdict (metrics.pair_verdict): 1 or 0 when both orders agree, 1/2 when the
preferred position stayed the same so the verdict flipped with the order. Identical texts
are a tie without asking. A pair whose either order stays unjudged has no verdict and is
counted, never guessed. An empty response is shown as EMPTY, since the judge's item
builder would otherwise drop it and the pair would look like a tie.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from prefalign.evaluation.metrics import pair_verdict

EMPTY = "(empty response)"


def _shown(text: str) -> str:
    return text if text.strip() else EMPTY


def judge_against_baseline(samples: Mapping[str, list[dict[str, Any]]], baseline: str,
                           prompts: Sequence[Any], judge: Any, template: str | None = None,
                           retries: int = 2, batch_size: int = 16, progress: bool = False,
                           ) -> dict[str, int]:
    """Ask `judge(texts, attempt) -> answers` (LocalJudge, HttpJudge) about every model's
    samples against the baseline's and set, on every sample row, judge_verdict (1, 1/2, 0,
    or None when unjudged), judge_flip (None unless both orders were judged) and
    judge_status ("judged", "identical", "unjudged"). Returns {model: unjudged pairs}."""
    from prefalign.preferences.listwise import DEFAULT_TEMPLATE, judge_batch

    template = template or DEFAULT_TEMPLATE
    base = samples[baseline]
    asks: list[tuple[dict, dict]] = []  # (sample row, item) for each order of each pair
    items: list[dict] = []
    for name, rows in samples.items():
        for row, other in zip(rows, base):
            row.update(judge_verdict=0.5, judge_flip=None, judge_status="identical")
            if row["text"] == other["text"]:
                continue
            mine, theirs = _shown(row["text"]), _shown(other["text"])
            where = f"{name} prompt {row['prompt_index']} sample {row['candidate']}"
            prompt = prompts[row["prompt_index"]]
            for order, candidates in (("model first", [mine, theirs]),
                                      ("model second", [theirs, mine])):
                items.append({"prompt": prompt, "candidates": candidates, "id": None,
                              "origin": f"{where}, {order}"})
                asks.append((row, items[-1]))
    records: list[dict] = []
    for start in range(0, len(items), batch_size):
        if progress:
            print(f"evaluate: judge {start}/{len(items)} asks", file=sys.stderr, flush=True)
        records.extend(judge_batch(items[start:start + batch_size], judge, template, retries))
    unjudged = {}
    for k in range(0, len(records), 2):
        row = asks[k][0]
        first, second = records[k], records[k + 1]
        if first["status"] != "judged" or second["status"] != "judged":
            row.update(judge_verdict=None, judge_status="unjudged")
            continue
        model_first = first["ranking"][0] == 0  # the model's response was candidate 0
        model_second = second["ranking"][0] == 1  # ... and candidate 1
        row.update(judge_verdict=pair_verdict(model_first, model_second),
                   judge_flip=model_first != model_second, judge_status="judged")
    for name, rows in samples.items():
        unjudged[name] = sum(r["judge_status"] == "unjudged" for r in rows)
        if unjudged[name]:
            print(f"warning: evaluate: {unjudged[name]} of {len(rows)} pairs of {name} against "
                  f"{baseline} stayed unjudged after {retries} retries; they are left out of "
                  "the judge's win rates and counted in the report", file=sys.stderr)
    return unjudged
