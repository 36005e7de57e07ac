"""The pairwise judge in evaluate: both orders, flips, unjudged pairs, an OpenAI-compatible
endpoint (a local scripted server) and a real local model as the judge."""

import argparse
import json

import pytest

from helpers import ScriptedServer, save_noisy_copy, write_jsonl
from prefalign.config import add_config_arguments, config_from_args
from prefalign.errors import ConfigError
from prefalign.evaluation import compute_metrics, evaluate
from prefalign.evaluation.command import EvaluateConfig, run_evaluate
from prefalign.evaluation.pairwise import EMPTY, judge_against_baseline
from prefalign.generation import SamplingConfig
from test_judge import rigged_judge


class Judge:
    """answer(text) -> the answer to one judge prompt; keeps every prompt asked."""

    name, settings = "fake", {"judge": "fake"}

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def __call__(self, texts, attempt):
        self.asked += texts
        return [self.answer(t) for t in texts]


def rows(texts):
    return [{"prompt_index": i // 2, "candidate": i % 2, "text": t, "length": len(t),
             "finished": True, "logp": 0.0, "ref_logp": 0.0} for i, t in enumerate(texts)]


def candidates(prompt_text):
    """The two candidates of a rendered judge prompt, in the order shown."""
    listing = prompt_text.split("Candidates:\n", 1)[1]
    return [listing.split("[0]\n", 1)[1].split("\n\n[1]", 1)[0],
            listing.split("[1]\n", 1)[1].split("\n\nAnswer", 1)[0]]


def test_position_a_judge_flips_every_pair():
    """A judge that always answers "0,1" prefers whatever is shown first: each pair's
    verdict flips with the order, so the win rate is 1/2 and the flip rate 1. Identical
    texts are a tie without asking."""
    samples = {"base": rows(["a", "b", "c", "d"]), "tuned": rows(["a", "bb", "cc", "dd"])}
    judge = Judge(lambda t: "0,1")
    unjudged = judge_against_baseline(samples, "base", ["p0", "p1"], judge)
    assert unjudged == {"base": 0, "tuned": 0}
    assert len(judge.asked) == 2 * 3  # three differing pairs, both orders; "a" = "a" not asked
    m = compute_metrics(samples, "base")
    assert m["tuned"]["win_rate/judge"] == 0.5 and m["tuned"]["judge/flip_rate"] == 1.0
    assert [r["judge_status"] for r in samples["tuned"]] == ["identical"] + ["judged"] * 3
    assert m["base"]["win_rate/judge"] == 0.5 and m["base"]["judge/flip_rate"] is None


def test_content_judge_wins_and_unjudged_pairs_are_counted():
    """A judge preferring the candidate with "good" in it, in either position: the model
    wins every judged pair with no flip. A pair whose answers never parse is unjudged,
    counted, and left out of the rates; an empty response is shown as EMPTY."""
    def answer(text):
        first, second = candidates(text)
        if "never" in text:
            return "no idea"
        return "0,1" if "good" in first else "1,0" if "good" in second else "?"

    judge = Judge(answer)
    samples = {"base": rows(["", "meh", "meh", "meh"]),
               "tuned": rows(["good", "good one", "never good", "good too"])}
    unjudged = judge_against_baseline(samples, "base", ["p0", "p1"], judge, retries=1)
    assert unjudged["tuned"] == 1
    assert len(judge.asked) == 2 * 4 + 2  # the unjudged pair's two orders asked again once
    assert any(candidates(t) == ["good", EMPTY] for t in judge.asked)
    m = compute_metrics(samples, "base")["tuned"]
    assert m["win_rate/judge"] == 1.0 and m["judge/flip_rate"] == 0.0
    assert m["judge/unjudged"] == 1.0


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval-judge")
    save_noisy_copy(tiny_model_dir, tokenizer, root / "tuned")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"The film {i}:"} for i in range(4)])
    return {"base": str(tiny_model_dir), "tuned": str(root / "tuned"), "prompts": prompts,
            "root": root}


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EvaluateConfig)
    return config_from_args(EvaluateConfig, parser.parse_args(argv))


def test_http_judge_through_the_command(models, tmp_path, monkeypatch):
    """`evaluate --judge-url`: every request reaches the local endpoint, which always
    answers "0,1" (position A): win rate 1/2 and flip rate 1 for tuned, with intervals in
    report.json and "±" in the tables."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = ScriptedServer({}, default=(200, "0,1"))
    out = tmp_path / "report"
    try:
        run_evaluate(parse([
            "--models", f"base={models['base']}", f"tuned={models['tuned']}",
            "--prompts", models["prompts"], "--scorer", "length(max=10)", "--output-dir",
            str(out), "--max-new-tokens", "6", "--num-samples", "2", "--judge-url",
            server.url, "--judge-model", "judge-7b", "--bootstrap", "200"]))
    finally:
        server.close()
    report = json.loads((out / "report.json").read_text("utf-8"))
    tuned = report["metrics"]["tuned"]
    assert tuned["win_rate/judge"] == 0.5 and tuned["judge/flip_rate"] == 1.0
    assert len(server.requests) == 2 * 8 - 2 * tuned["judge/unjudged"] - 2 * sum(
        r["judge_status"] == "identical" for r in map(json.loads, (out / "samples.jsonl")
                                                      .read_text().splitlines())
        if r["model"] == "tuned")
    assert {r["body"]["model"] for r in server.requests} == {"judge-7b"}
    assert report["settings"]["judge"]["backend"] == "http"
    assert report["bootstrap"]["resamples"] == 200
    ci = report["intervals"]["tuned"]
    assert {"score/mean", "win_rate/score", "kl", "win_rate/judge", "judge/flip_rate",
            "win_rate/judge_lc"} <= set(ci)
    assert ci["kl"]["ci95"][0] <= tuned["kl"] <= ci["kl"]["ci95"][1]
    md = (out / "report.md").read_text("utf-8")
    half = (ci["kl"]["ci95"][1] - ci["kl"]["ci95"][0]) / 2
    assert f"{tuned['kl']:.4g} ± {half:.2g}" in md and "half the width" in md
    assert " ± " in (out / "report.html").read_text("utf-8")


def test_judge_flags_are_checked_before_sampling(models, tmp_path):
    base = ["--models", f"base={models['base']}", "--prompts", models["prompts"],
            "--output-dir", str(tmp_path / "r")]
    with pytest.raises(ConfigError, match="--judge-model NAME too"):
        run_evaluate(parse(base + ["--judge-url", "http://127.0.0.1:9/v1"]))
    with pytest.raises(ConfigError, match="no such model directory"):
        run_evaluate(parse(base + ["--judge-model", str(tmp_path / "nope")]))
    with pytest.raises(ConfigError, match="bootstrap"):
        run_evaluate(parse(base + ["--bootstrap", "-1"]))
    assert not (tmp_path / "r").exists()


def test_real_local_model_as_judge(models, tmp_path, tokenizer):
    """A real (hand-wired) local causal LM that answers "1,0" greedily: it prefers
    position B, so every judged pair flips."""
    judge_dir = rigged_judge(tokenizer, tmp_path / "judge")
    result = evaluate({"base": models["base"], "tuned": models["tuned"]}, models["prompts"],
                      tmp_path / "out", sampling=SamplingConfig(max_new_tokens=4, seed=1),
                      judge=judge_dir, judge_retries=0, judge_max_new_tokens=6,
                      bootstrap=50, progress=False)
    tuned = result.metrics["tuned"]
    assert tuned["judge/unjudged"] == 0.0
    assert tuned["win_rate/judge"] == 0.5 and tuned["judge/flip_rate"] == 1.0
    assert result.report["settings"]["judge"]["backend"] == "local"
