"""Scoring responses: the Scorer interface (base), the built-in checks (builtins, command),
Python functions in ours and TRL's signature (functions), reward models (reward_model) and
the spec strings that name them (spec). Every command that scores (iterate, generate,
evaluate) builds its scorer with load_scorer; the on-policy trainers build theirs from several
weighted sources with scoring.rewards (TRL's reward_funcs and reward_weights).

scoring.reward_model (RewardScorer, score_sequences) and scoring.score_file import torch
and the model code; import them from their modules when a reward model scores.
"""

from prefalign.scoring.base import (
    ItemScorer,
    Scorer,
    TextPrompts,
    WeightedSum,
    check_scores,
    describe_value,
    prompt_text,
    row_columns,
)
from prefalign.scoring.builtins import BUILTINS
from prefalign.scoring.code import extract_code
from prefalign.scoring.command import Command, CommandResult
from prefalign.scoring.functions import FunctionScorer, batched, is_trl_reward_function
from prefalign.scoring.spec import SCORER_HELP, RewardModelScorer, load_scorer, parse_spec

__all__ = [
    "BUILTINS", "SCORER_HELP", "Command", "CommandResult", "FunctionScorer", "ItemScorer",
    "RewardModelScorer", "Scorer", "TextPrompts", "WeightedSum", "batched", "check_scores",
    "describe_value", "extract_code", "is_trl_reward_function", "load_scorer", "parse_spec",
    "prompt_text", "row_columns",
]
