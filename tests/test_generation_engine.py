"""The generation engine of the on-policy loop: the one interface, its one engine ("hf"),
and the option that picks it."""

import pytest
import torch

from helpers import run_cli
from prefalign.generation import SamplingConfig, generate
from prefalign.generation_engine import ENGINES, HFEngine, make_engine

PROMPTS = ["The film was", "Hi", "Please write a short poem about the sea. The sea is",
           "def add(a, b):", "Review 4: The film"]


def rows(gens):
    return [(g.prompt_index, g.candidate, g.response_ids, g.text, g.finished) for g in gens]


def test_hf_engine_is_generate_on_the_trained_model(make_model, tokenizer):
    """The same responses as generation.generate; a weight changed in place is sampled
    at the next call (the engine holds the model itself, no copy to refresh)."""
    model = make_model("llama")
    engine = make_engine("hf", model, tokenizer)
    assert isinstance(engine, HFEngine) and engine.name == "hf" and ENGINES == ("hf",)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, n=2, seed=4)
    before = engine.generate(PROMPTS, cfg)
    assert rows(before) == rows(generate(model, tokenizer, PROMPTS, cfg))
    assert all(g.prompt_ids and g.logprobs for g in before)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    assert rows(engine.generate(PROMPTS, cfg)) != rows(before)


def test_a_share_of_a_window_samples_what_the_whole_window_does(make_model, tokenizer):
    """The on-policy contract: a process's prompts, keyed by their window positions and
    batched otherwise, get exactly the rows the whole window gives them on one process."""
    engine = make_engine("hf", make_model("llama"), tokenizer)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, n=3, seed=9, batch_size=4)
    whole = engine.generate(PROMPTS, cfg)
    share = [3, 0, 4]
    part = engine.generate([PROMPTS[k] for k in share],
                           SamplingConfig(max_new_tokens=6, temperature=1.0, n=3, seed=9,
                                          batch_size=1), seed_indices=share)
    assert rows(part) == [r for k in share for r in rows(whole[3 * k : 3 * k + 3])]


def test_engine_option_is_in_the_sampling_section_and_checked(capsys, tmp_path):
    code, out, _ = run_cli(capsys, ["grpo", "--help"])
    assert code == 0
    sampling = out[out.index("\nsampling:\n"):]
    assert "--generation-engine" in sampling.split("\n\n")[0]
    code, _, err = run_cli(capsys, ["grpo", "--model", "m", "--data", "d", "--reward-fn", "x",
                                    "--output-dir", tmp_path / "o", "--generation-engine",
                                    "vllm"])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "generation" in err and "hf" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_every_on_policy_command_offers_the_engine(command, capsys):
    code, out, _ = run_cli(capsys, [command, "--help"])
    assert code == 0 and "--generation-engine" in out
