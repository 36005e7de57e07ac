"""`prefalign score`: its config and run (the scoring itself: scoring.score_file)."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.config import option, require
from prefalign.data.chat import ChatOptions
from prefalign.hub import DownloadOption, RemoteCodeOption

DESCRIPTION = (
    "Score every row of a data file with a reward model and write the rows with their scores "
    "as JSONL: preference pairs get score_chosen and score_rejected, prompt + response (or "
    "completion, or a conversation in messages) rows get score. Sequences are formatted and "
    "truncated exactly as in reward training. A chat template given in training is already "
    "saved with the reward model's tokenizer; give --text-as-chat when training did.")


@dataclass(frozen=True)
class ScoreConfig(ChatOptions, RemoteCodeOption, DownloadOption):
    SECTION = ""
    COMMAND = "score"

    reward_model: str = option("", "reward model directory (OUTPUT/final of prefalign reward)")
    data: str = option("", "rows to score: JSONL, JSON, Parquet, CSV or a datasets folder")
    output: str | None = option(None, "JSONL to write (none = DATA.scored.jsonl)")
    batch_size: int = option(8, "sequences per forward pass")
    max_length: int = option(1024, "maximum prompt+response tokens, as in training")
    max_prompt_length: int = option(512, "maximum prompt tokens, as in training")

    def validate(self) -> None:
        require(bool(self.reward_model), "reward_model", "is required (--reward-model DIR)")
        require(bool(self.data), "data", "is required (--data FILE)")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        super().validate()


def run(config: ScoreConfig) -> int:
    from prefalign.scoring.score_file import score_file

    score_file(config.reward_model, config.data, config.output, config.batch_size,
               max_length=config.max_length, max_prompt_length=config.max_prompt_length,
               trust_remote_code=config.trust_remote_code, chat_template=config.chat_template,
               text_as_chat=config.text_as_chat)
    return 0
