"""The Scorer interface: (prompts, responses[, columns]) -> one finite float per response.

Best-of-N ranks samples by a scorer, PPO and iterate use it as a reward and evaluation
reports it. Every call is checked: one finite number per pair, else a PrefalignError naming
the scorer (None, TRL's "no reward for this sample", is refused too: every response needs a
number). A call may also pass `columns`, the prompt rows' other fields ({name: one value per
response}); only scorers that need them (math_answer, functions in TRL's form) read them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from prefalign.errors import PrefalignError


class Scorer:
    """Base class: subclasses implement `_score`; calling a scorer checks what it returns."""

    name = "scorer"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None) -> list[float]:
        """columns: the rows' other fields, {name: one value per response}, or None."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise PrefalignError(
                f"scorer {self.name}: {len(prompts)} prompts but {len(responses)} responses"
            )
        columns = {k: list(v) for k, v in (columns or {}).items()}
        wrong = [k for k, v in columns.items() if len(v) != len(responses)]
        if wrong:
            raise PrefalignError(f"scorer {self.name}: column {wrong[0]!r} has "
                                 f"{len(columns[wrong[0]])} values for {len(responses)} responses")
        if not responses:
            return []
        return check_scores(self._score_columns(prompts, responses, columns), len(responses),
                            self.name)

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              columns: Mapping[str, Sequence[Any]] | None = None) -> list[float]:
        """The same as calling the scorer; named like RewardScorer.score."""
        return self(prompts, responses, columns)

    def _score_columns(self, prompts: list[str], responses: list[str],
                       columns: dict[str, list[Any]]) -> Sequence[Any]:
        """Scorers that read the rows' other fields override this; the rest ignore them."""
        return self._score(prompts, responses)

    def _score(self, prompts: list[str], responses: list[str]) -> Sequence[Any]:
        raise NotImplementedError


def row_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """{name: [value per row]} from prompt rows that carry their other fields under
    "extra_columns" (data.prompts.load_prompts); a field missing from some rows is None
    there; {} when no row has any."""
    extras = [row.get("extra_columns") or {} for row in rows]
    names: dict[str, None] = {}
    for extra in extras:
        names.update(dict.fromkeys(extra))
    return {name: [extra.get(name) for extra in extras] for name in names}


class ItemScorer(Scorer):
    """A scorer defined one (prompt, response) pair at a time."""

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.score_one(p, r) for p, r in zip(prompts, responses)]

    def score_one(self, prompt: str, response: str) -> float:
        raise NotImplementedError


def check_scores(scores: Any, count: int, name: str) -> list[float]:
    """`scores` as `count` finite floats, or a PrefalignError naming the scorer."""
    if hasattr(scores, "tolist"):  # numpy arrays and torch tensors
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise PrefalignError(
            f"scorer {name} returned {describe_value(scores)}, not a list of {count} numbers"
        )
    if len(scores) != count:
        raise PrefalignError(f"scorer {name} returned {len(scores)} scores for {count} responses")
    checked = []
    for i, value in enumerate(scores):
        if hasattr(value, "item") and not isinstance(value, numbers.Real):
            value = value.item()  # a 0-d tensor or array per item
        if value is None:
            raise PrefalignError(
                f"scorer {name} returned None at position {i} (no reward for that response); "
                "every response needs a number: return a default such as 0.0 instead")
        if not isinstance(value, numbers.Real):
            raise PrefalignError(
                f"scorer {name} returned {describe_value(value)} at position {i}; scores are numbers"
            )
        if not math.isfinite(value):
            raise PrefalignError(f"scorer {name} returned {value} at position {i}; "
                                 "scores must be finite")
        checked.append(float(value))
    return checked


def describe_value(value: Any) -> str:
    return f"a {type(value).__name__} ({value!r:.40})"



class WeightedSum(Scorer):
    """sum_i weight_i * score_i over (scorer, weight) terms."""

    def __init__(self, terms: list[tuple[Scorer, float]]):
        self.terms = terms
        self.name = ",".join(f"{scorer.name}:{weight:g}" for scorer, weight in terms)

    def components(self, prompts: Sequence[str], responses: Sequence[str],
                   columns: Mapping[str, Sequence[Any]] | None = None) -> list[tuple]:
        """[(name, weight, scores)] per term, unweighted: to log what the sum is made of."""
        return [(s.name, w, s(prompts, responses, columns)) for s, w in self.terms]

    def _score_columns(self, prompts: list[str], responses: list[str],
                       columns: dict[str, list[Any]]) -> list[float]:
        total = [0.0] * len(responses)
        for scorer, weight in self.terms:
            for i, value in enumerate(scorer(prompts, responses, columns)):
                total[i] += weight * value
        return total

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self._score_columns(prompts, responses, {})



def prompt_text(tokenizer: Any, prompt: str | list[dict]) -> str:
    """What a scorer sees of a prompt: the text itself, or the rendered chat template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


class TextPrompts(Scorer):
    """`scorer` with chat prompts (lists of messages) rendered to text through the
    tokenizer's chat template first: rule scorers and functions read strings."""

    def __init__(self, scorer: Scorer, tokenizer: Any):
        self.scorer, self.tokenizer = scorer, tokenizer
        self.name = scorer.name

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None) -> list[float]:
        return self.scorer([prompt_text(self.tokenizer, p) for p in prompts], responses, columns)
