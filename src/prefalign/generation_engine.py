"""What samples the rollouts of the on-policy loop: one small interface and its one engine.

The loop (algorithms.onpolicy) asks a `GenerationEngine` for responses and never calls a
sampler itself, so another engine can sit behind the same call. The only engine is "hf":
generation.generate, the KV-cache batched sampler, running the trained model itself, so
it always samples the current weights. An engine that serves the policy from a copy of
its own would also need that copy refreshed after every update; no such engine exists.

The contract every engine keeps (the loop's proofs rest on it): the responses of prompt
key i, candidate j depend on (sampling.seed, i, j) and the weights only, never on how the
prompts are batched or which process samples them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from prefalign.config import Section, option
from prefalign.generation import Generation, Prompt, SamplingConfig, generate

ENGINES = ("hf",)


@dataclass(frozen=True)
class EngineOptions(Section):
    """The engine option of the sampling section, for the commands that sample rollouts."""

    SECTION = "sampling"

    generation_engine: str = option(
        "hf", "what samples the rollouts: hf = the KV-cache batched sampler running the "
        "trained model itself", choices=ENGINES)


class GenerationEngine(Protocol):
    name: str

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 seed_indices: Sequence[int] | None = None) -> list[Generation]:
        """sampling.n responses per prompt, in the order of generation.generate: (prompt 0,
        candidate 0), (prompt 0, candidate 1), ...; each with prompt_ids, response_ids,
        logprobs, text, finish_reason and finished. seed_indices: the key of each prompt's
        noise (default: its position in `prompts`)."""


class HFEngine:
    """generation.generate on the model being trained (LoRA adapters on), no progress bar."""

    name = "hf"

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 seed_indices: Sequence[int] | None = None) -> list[Generation]:
        return generate(self.model, self.tokenizer, prompts, sampling, progress=False,
                        seed_indices=seed_indices)


def make_engine(name: str, model: nn.Module, tokenizer: Any) -> GenerationEngine:
    """The engine `name` (one of ENGINES; the config's choices have checked it) over `model`."""
    engines = {"hf": HFEngine}
    return engines[name](model, tokenizer)
