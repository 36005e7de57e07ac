"""The reward of an on-policy run, as TRL users write it: several sources (reward_fn specs,
a reward model, a Python function) and one weight per term (reward_weights), summed by
WeightedSum, whose reward_terms the trainers log one by one (rewards/<name>/mean, /std)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prefalign.config import Section, option, require
from prefalign.errors import ConfigError
from prefalign.scoring.base import Scorer, term_name
from prefalign.scoring.spec import SCORER_HELP, Term, combine_terms, is_dir, parse_spec


@dataclass(frozen=True)
class RewardOptions(Section):
    """The reward section of every on-policy command: a reward model, or reward functions
    with one weight each."""

    SECTION = "rewards"

    reward_model: str | None = option(None, "reward model directory (from prefalign reward)")
    reward_fn: list[str] | None = option(
        None, "a reward instead of a reward model; repeatable (YAML: a list), the rewards "
        "are summed (weights: reward_weights) and each is logged as rewards/<name>/mean and "
        "/std; a function in TRL's form may return None for a sample it does not score "
        "(left out of that sample's sum). Each SPEC is " + SCORER_HELP, action="append",
        metavar="SPEC")
    reward_weights: list[float] | None = option(
        None, "one weight per reward_fn term, in order, as TRL's reward_weights (e.g. 1,0.5); "
        "none: each term counts 1, or its spec's :W")

    def validate(self) -> None:
        require(not (self.reward_model and self.reward_fn), "reward_model",
                "and reward_fn exclude each other: give one")
        super().validate()


def config_rewards(config: Any, scorer: Callable | None) -> Scorer:
    """The reward a command's config names (see reward_sources), weighted by its
    reward_weights."""
    return load_rewards(reward_sources(config, scorer), reward_weights(config))


def check_config_rewards(config: Any, scorer: Callable | None) -> None:
    """config_rewards' checks, without building anything: before any model loads."""
    plan_rewards(reward_sources(config, scorer), reward_weights(config))


def reward_sources(config: Any, scorer: Callable | None) -> list[Any]:
    """What scores the rollouts: `scorer`, else the reward model, else the reward_fn specs
    (a list; a plain string from Python code is one spec)."""
    if scorer:
        return [scorer]
    if config.reward_model:
        return [config.reward_model]
    specs = config.reward_fn
    return [specs] if isinstance(specs, str) else list(specs or [])


def reward_weights(config: Any) -> list[float] | None:
    # A command may offer no reward_weights: every term then counts 1 (or its spec's :W).
    return getattr(config, "reward_weights", None)


def load_rewards(sources: Sequence[str | Scorer | Callable],
                 weights: Sequence[float] | None = None) -> Scorer:
    """The reward of an on-policy run from several sources, as TRL's reward_funcs and
    reward_weights: spec strings (each of one or more terms), Python functions and Scorers
    (one term each), and `weights`, one per term in order, else each term's own ':W' (1 when
    none). One unweighted term is that scorer itself, else a WeightedSum: its reward_terms
    are what the trainers log per term."""
    return combine_terms(plan_rewards(sources, weights), {}, "the reward")


def plan_rewards(sources: Sequence[str | Scorer | Callable], weights: Sequence[float] | None
                 ) -> list[tuple[Any, float | None]]:
    """The terms of `sources` with their weights, checked before anything is built (or a
    model loaded): one weight per term, and no term weighted both in its spec and by
    `weights`. Consecutive strings are read as one spec joined by ',' (a YAML string given
    for a list option arrives cut at its commas); a directory stays one term."""
    items: list[Any] = []
    pending: list[str] = []
    for source in [*sources, None]:
        if isinstance(source, str) and not is_dir(source.strip()):
            pending.append(source)
            continue
        if pending:
            items += [(t, t.weight) for t in parse_spec(",".join(pending))]
            pending = []
        if isinstance(source, str):
            items.append((Term(source.strip(), source.strip(), {}, None), None))
        elif source is not None:
            items.append((source, None))
    if not items:
        raise ConfigError("no reward: give reward_fn (a scorer spec) or reward_model")
    if weights is None:
        return items
    names = [term_name(t.text if isinstance(t, Term) else getattr(t, "name", None)
                       or getattr(t, "__name__", type(t).__name__)) for t, _ in items]
    if len(weights) != len(items):
        raise ConfigError(f"config key 'reward_weights': {len(weights)} weight(s) for "
                          f"{len(items)} reward function(s) ({', '.join(names)}); give one "
                          "weight per function, in the order of reward_fn")
    weighted = [t.text for t, w in items if w is not None]
    if weighted:
        raise ConfigError(f"config key 'reward_weights': the term {weighted[0]!r} has its own "
                          "':W' weight; weight each term either in its spec or with "
                          "reward_weights, not both")
    return [(t, float(w)) for (t, _), w in zip(items, weights)]
