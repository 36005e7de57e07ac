"""Judges you can trust: listwise order shuffling, pairwise judging in both orders (position
flips caught), ties, and confidence from a local model's logits or repeated API asks."""

import copy
import math

import pytest
import torch

from helpers import ScriptedServer, write_jsonl
from prefalign.errors import ConfigError
from prefalign.generation import render_prompts
from prefalign.preferences import judge as judge_module
from prefalign.preferences.judge import judge_preferences
from prefalign.preferences.listwise import judge_batch
from prefalign.preferences.pairwise import combine, majority, parse_choice
from prefalign.tiny import build_model
from test_judge import lines, run_cli


class TextJudge:
    """Answers each prompt with answer(prompt text); records every prompt it is asked."""

    name, settings = "text", {"judge": "text"}

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def __call__(self, texts, attempt):
        self.asked.extend(texts)
        return [self.answer(t) for t in texts]


def first_shown(text):
    """Which response a pairwise prompt shows first: the word after "Response 0:"."""
    return text.split("Response 0:\n")[1].split()[0]


# ---- pure pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "choice"), [
    ("0", 0), ("1", 1), ("Response 1 is better.", 1), ("Tie.", "tie"), (" TIE ", "tie")])
def test_pairwise_answers_parse(answer, choice):
    assert parse_choice(answer) == choice


@pytest.mark.parametrize("answer", ["0 or 1", "neither", "10", "2", "1.5"])
def test_unclear_pairwise_answers_are_refused(answer):
    with pytest.raises(ValueError):
        parse_choice(answer)


def test_combining_both_orders():
    # (3, 5) asked as (3, 5) says "0" (=3); asked as (5, 3) says "1" (=3): consistent.
    assert combine(3, 5, (0, 0.8), (1, 0.6)) == {"verdict": 3, "consistent": True,
                                                 "confidence": pytest.approx(0.7)}
    # "0" both times: the first position won, whichever answer sat there.
    assert combine(3, 5, (0, 0.9), (0, 0.9))["consistent"] is False
    assert combine(3, 5, ("tie", None), ("tie", None))["verdict"] == "tie"
    assert combine(3, 5, (None, None), (0, 1.0))["consistent"] is None
    assert majority([0, 0, 1]) == (0, pytest.approx(2 / 3))
    assert majority([0, 1]) == ("tie", 0.5)


# ---- listwise: shuffled, reproducible order -----------------------------------------------


def test_listwise_order_is_shuffled_per_item_and_reproducible():
    items = [{"prompt": f"q{i}", "candidates": ["a", "b", "c", "d"], "origin": f"x:{i}",
              "id": None} for i in range(12)]

    def orders(seed):
        judge = TextJudge(lambda t: "0,1,2,3")
        return [tuple(r["shown"]) for r in judge_batch(items, judge, "{prompt}{candidates}",
                                                       0, seed=seed)]

    first = orders(0)
    assert first == orders(0)  # a rerun asks the same
    assert first != orders(1)
    assert {o[0] for o in first} != {0}  # no candidate always first
    assert all(sorted(o) == [0, 1, 2, 3] for o in first)
    # Without a seed (evaluate swaps the two answers itself) the input order is kept.
    assert set(orders(None)) == {(0, 1, 2, 3)}


# ---- pairwise with scripted judges --------------------------------------------------------


@pytest.fixture
def pair_items(tmp_path):
    rows = [{"prompt": "Be kind.", "candidates": ["rude", "kind", "kind"], "id": "k"},
            {"prompt": "Pick.", "candidates": ["same1", "same2"]},
            {"prompt": "Rank.", "candidates": ["good", "bad", "kind"]}]
    return write_jsonl(tmp_path / "c.jsonl", rows)


@pytest.mark.parametrize(("policy", "verdict"), [("tie", "tie"), ("drop", None)])
def test_a_judge_that_always_prefers_position_a_is_caught(tmp_path, pair_items, policy,
                                                          verdict):
    out = tmp_path / "pairs.jsonl"
    judge = TextJudge(lambda t: "0")
    report = judge_preferences(pair_items, out, judge, judge_module.load_template(
        None, "pairwise"), mode="pairwise", on_inconsistent=policy, progress=False)
    assert out.read_text() == ""
    records = lines(tmp_path / "pairs.judgments.jsonl")
    assert [r["flip_rate"] for r in records] == [1.0, 1.0, 1.0]
    assert all(p["verdict"] == verdict and p["consistent"] is False
               for r in records for p in r["pairs"])
    # 1 + 1 + 3 pairs, each asked twice; the repeated "kind" is asked about once.
    assert len(judge.asked) == 10 and report.asked == 5 and report.flips == 5
    assert (report.ties, report.dropped) == ((5, 0) if policy == "tie" else (0, 5))
    assert "position-flip rate 1.000" in report.format()


def test_consistent_verdicts_make_pairs_and_ties_make_none(tmp_path, pair_items):
    rank = {"kind": 0, "good": 1, "rude": 2, "bad": 3}

    def answer(text):
        a, b = text.split("Response 0:\n")[1].split("\n\nResponse 1:\n")
        b = b.split("\n")[0]
        if a.startswith("same"):
            return "tie"
        return "0" if rank[a] < rank[b] else "1"

    out = tmp_path / "pairs.jsonl"
    report = judge_preferences(pair_items, out, TextJudge(answer),
                               judge_module.load_template(None, "pairwise"), mode="pairwise",
                               progress=False)
    pairs = lines(out)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("kind", "rude"), ("good", "bad"), ("kind", "good"), ("kind", "bad")]
    assert pairs[0]["id"] == "k" and pairs[0]["confidence"] is None
    assert (report.asked, report.flips, report.ties) == (5, 0, 1)
    records = lines(tmp_path / "pairs.judgments.jsonl")
    assert [r["flip_rate"] for r in records] == [0.0, 0.0, 0.0]
    assert records[1]["pairs"][0]["verdict"] == "tie"
    assert "1 ties" in report.format()


def test_pairwise_options_that_would_not_apply_are_refused(tmp_path, pair_items):
    out = str(tmp_path / "o.jsonl")
    judge = TextJudge(lambda t: "0")
    with pytest.raises(ConfigError, match="need --mode pairwise"):
        judge_preferences(pair_items, out, judge, min_confidence=0.7, progress=False)
    with pytest.raises(ConfigError, match="needs --samples"):
        judge_preferences(pair_items, out, judge, mode="pairwise", min_confidence=0.7,
                          progress=False)
    with pytest.raises(ConfigError, match="--temperature 0"):
        judge_preferences(pair_items, out, judge, mode="pairwise", samples=3, progress=False)
    bad = tmp_path / "t.txt"
    bad.write_text("{prompt} {candidates}")
    with pytest.raises(ConfigError, match="no {a} or {b} placeholder"):
        judge_module.load_template(bad, "pairwise")


# ---- confidence from a real tiny local model's logits -------------------------------------


def rigged_pairwise_judge(tokenizer, path, good, bad):
    """A Llama whose layers add nothing, so the next token is a function of the current one:
    after "... {bad}" (the good answer sat first) it says "0" -> EOS with logits 2 vs 1 for
    "0" vs "1"; after "... {good}" it says "1" with logits 1.5 vs 1. The template ends with
    the second response, so this judge is consistent, with known confidences."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None  # the prompt ends with the second response's last token
    model = build_model(tokenizer, arch="llama", num_layers=1)
    last = {w: render_prompts(tokenizer, [f"Q\n{x}\n{w}"])[0][-1]
            for w, x in ((good, bad), (bad, good))}
    zero, one = tokenizer.convert_tokens_to_ids(["0", "1"])
    eos = tokenizer.eos_token_id
    assert len({last[good], last[bad], zero, one, eos}) == 5
    scale = 1 / math.sqrt(model.config.hidden_size)  # the final RMSNorm makes a one-hot sqrt(H)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        logits = {last[bad]: {zero: 2.0, one: 1.0}, last[good]: {zero: 1.0, one: 1.5},
                  zero: {eos: 10.0}, one: {eos: 10.0}}
        for slot, (token, following) in enumerate(logits.items()):
            model.model.embed_tokens.weight[token, slot] = 1.0
            for nxt, value in following.items():
                model.lm_head.weight[nxt, slot] = value * scale
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_local_confidence_is_the_verdict_tokens_probability(tmp_path, tokenizer):
    good, bad = "Thanks", "Nope"
    judge_dir = rigged_pairwise_judge(tokenizer, tmp_path / "judge", good, bad)
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q", "candidates": [bad, good]}])
    template = tmp_path / "t.txt"
    template.write_text("{prompt}\n{a}\n{b}")
    base = ["--input", data, "--judge-model", judge_dir, "--mode", "pairwise", "--template",
            str(template), "--max-new-tokens", "3", "--retries", "0"]
    out = tmp_path / "pairs.jsonl"
    assert run_cli([*base, "--output", str(out)]) == 0
    record = lines(tmp_path / "pairs.judgments.jsonl")[0]
    pair = record["pairs"][0]
    assert pair["answers"] == [["1"], ["0"]] and record["flip_rate"] == 0.0
    # By hand: sigmoid(2 - 1) for "0" after "Nope", sigmoid(1.5 - 1) for "1" after "Thanks".
    by_hand = [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-1.0))]
    assert pair["confidences"] == pytest.approx(by_hand, abs=1e-3)
    row = lines(out)[0]
    assert (row["chosen"], row["rejected"]) == (good, bad)
    assert row["confidence"] == pytest.approx(sum(by_hand) / 2, abs=1e-3)  # 0.677
    strict = tmp_path / "strict.jsonl"
    assert run_cli([*base, "--output", str(strict), "--min-confidence", "0.7"]) == 0
    assert strict.read_text() == ""
    loose = tmp_path / "loose.jsonl"
    assert run_cli([*base, "--output", str(loose), "--min-confidence", "0.6"]) == 0
    assert len(lines(loose)) == 1


# ---- confidence from repeated API asks ----------------------------------------------------


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_api_confidence_is_agreement_over_samples(tmp_path, no_proxy):
    # One request at a time: each item's three forward asks, then its three backward asks.
    server = ScriptedServer({
        "alpha": ["0", "0", "1", "1", "1", "1"],  # alpha first: 2/3 for alpha; then 3/3
        "delta": ["0", "1", "0", "0", "1", "0"],  # 2/3 for delta first, 2/3 for gamma first
    })
    server.script = {k: [(200, a) for a in v] for k, v in server.script.items()}
    rows = [{"prompt": "P", "candidates": ["alpha", "beta"]},
            {"prompt": "Q", "candidates": ["delta", "gamma"]}]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    try:
        assert run_cli(["--input", data, "--output", str(out), "--judge-url", server.url,
                        "--judge-model", "m", "--mode", "pairwise", "--samples", "3",
                        "--temperature", "0.7", "--workers", "1", "--batch-size", "1",
                        "--min-confidence", "0.8"]) == 0
    finally:
        server.close()
    assert len(server.requests) == 12
    assert {r["body"]["temperature"] for r in server.requests} == {0.7}
    records = lines(tmp_path / "pairs.judgments.jsonl")
    assert records[0]["pairs"][0]["confidences"] == pytest.approx([2 / 3, 1.0])
    assert records[1]["pairs"][0]["consistent"] is False  # delta, then gamma: a flip
    assert [(r["chosen"], r["confidence"]) for r in lines(out)] == [
        ("alpha", pytest.approx(5 / 6))]
