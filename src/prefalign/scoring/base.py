"""The Scorer interface: (prompts, responses[, columns]) -> one finite float per response.

Best-of-N ranks samples by a scorer, PPO and iterate use it as a reward and evaluation
reports it. Every call is checked: one finite number per pair, else a PrefalignError naming
the scorer (None, TRL's "no reward for this sample", is refused too: every response needs a
number). A call may also pass `columns`, the prompt rows' other fields ({name: one value per
response}); only scorers that need them (math_answer, functions in TRL's form) read them.

`reward_terms` is the rewards' view (the on-policy trainers): each term's own scores, None
kept as NaN, with a name for the logs (`rewards/<name>/mean`) and its weight;
`RewardTerms.total` sums them as TRL does (a term that returned None is left out of that
response's sum).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.errors import PrefalignError


class Scorer:
    """Base class: subclasses implement `_score`; calling a scorer checks what it returns."""

    name = "scorer"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None) -> list[float]:
        """columns: the rows' other fields, {name: one value per response}, or None."""
        prompts, responses, columns = self._inputs(prompts, responses, columns)
        if not responses:
            return []
        return check_scores(self._score_columns(prompts, responses, columns), len(responses),
                            self.name)

    def reward_terms(self, prompts: Sequence[str], responses: Sequence[str],
                     columns: Mapping[str, Sequence[Any]] | None = None) -> RewardTerms:
        """The scores as reward terms: one term here (WeightedSum has one per term), its
        None scores kept as NaN (TRL's "no reward for this sample")."""
        prompts, responses, columns = self._inputs(prompts, responses, columns)
        scores = (check_scores(self._score_columns(prompts, responses, columns),
                               len(responses), self.name, allow_none=True) if responses else [])
        return RewardTerms([term_name(self.name)], [1.0], [scores])

    def _inputs(self, prompts: Sequence[str], responses: Sequence[str],
                columns: Mapping[str, Sequence[Any]] | None
                ) -> tuple[list[str], list[str], dict[str, list[Any]]]:
        """The call's arguments as lists, checked to have one value per response."""
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
        return prompts, responses, columns

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


def check_scores(scores: Any, count: int, name: str, allow_none: bool = False) -> list[float]:
    """`scores` as `count` finite floats, or a PrefalignError naming the scorer; with
    allow_none, a None (TRL's "no reward for this sample") becomes NaN."""
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
        if value is None and allow_none:
            checked.append(math.nan)
            continue
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

    def reward_terms(self, prompts: Sequence[str], responses: Sequence[str],
                     columns: Mapping[str, Sequence[Any]] | None = None) -> RewardTerms:
        """One term per (scorer, weight), in order (a nested sum's terms with its weight
        multiplied in); names made unique."""
        names, weights, scores = [], [], []
        for scorer, weight in self.terms:
            part = scorer.reward_terms(prompts, responses, columns)
            names += part.names
            weights += [weight * w for w in part.weights]
            scores += part.scores
        return RewardTerms(unique_names(names), weights, scores)

    def _score_columns(self, prompts: list[str], responses: list[str],
                       columns: dict[str, list[Any]]) -> list[float]:
        total = self.reward_terms(prompts, responses, columns).total()
        missing = [i for i, value in enumerate(total) if math.isnan(value)]
        if missing:
            raise PrefalignError(
                f"scorer {self.name}: every term returned None at position {missing[0]} (no "
                "reward for that response); every response needs a number from some term")
        return total

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self._score_columns(prompts, responses, {})


@dataclass
class RewardTerms:
    """The reward terms of K scorers on N responses: names (unique, for logging), weights
    (K,), and each term's unweighted scores, K lists of N floats, NaN where it returned None."""

    names: list[str]
    weights: list[float]
    scores: list[list[float]]

    def total(self) -> list[float]:
        """sum_k weight_k * score_k per response over the terms that scored it (TRL's nansum
        of the weighted rewards); NaN where no term did (TRL's unscorable completion)."""
        totals = []
        for column in zip(*self.scores):
            scored = [(w, s) for w, s in zip(self.weights, column) if not math.isnan(s)]
            totals.append(sum(w * s for w, s in scored) if scored else math.nan)
        return totals


def term_name(text: str) -> str:
    """A reward term's name in the logs, from the spec text that names it: a function's
    name (module:fn -> fn), a built-in's name without its parameters, a reward-model
    directory's last component (TRL names a reward model by its id's last part)."""
    target = text if Path(text).expanduser().is_dir() else text.split("(", 1)[0].strip()
    if Path(target).expanduser().is_dir():
        return Path(target).expanduser().resolve().name
    return target.rpartition(":")[2].rpartition(".")[2] if ":" in target else target


def unique_names(names: list[str]) -> list[str]:
    """`names` with repeats numbered: [a, a, b] -> [a, a_2, b]."""
    taken: set[str] = set()
    out = []
    for name in names:
        unique, k = name, 1
        while unique in taken:
            k += 1
            unique = f"{name}_{k}"
        taken.add(unique)
        out.append(unique)
    return out



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

    def reward_terms(self, prompts: Sequence[Any], responses: Sequence[str],
                     columns: Mapping[str, Sequence[Any]] | None = None) -> RewardTerms:
        return self.scorer.reward_terms([prompt_text(self.tokenizer, p) for p in prompts],
                                        responses, columns)
