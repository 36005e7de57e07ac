"""LLM as judge: answer parsing, real local models (garbage and rigged), a real local
HTTP server with scripted answers, retries, unjudged records, resume, and the API key."""

import argparse
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from helpers import ScriptedJudge, ScriptedServer, write_jsonl
from prefalign.config import add_config_arguments, config_from_args
from prefalign.data import load_preferences
from prefalign.errors import ConfigError, PrefalignError
from prefalign.generation import render_prompts
from prefalign.preferences import judge_command
from prefalign.preferences.http_judge import HttpJudge
from prefalign.preferences.judge import judge_preferences, load_template
from prefalign.preferences.listwise import DEFAULT_TEMPLATE, parse_ranking, render_prompt
from prefalign.tiny import build_model

KEY = "sk-test-7f3a9c1e-DO-NOT-LEAK"


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, judge_command.JudgeConfig)
    return judge_command.run(config_from_args(judge_command.JudgeConfig, parser.parse_args(argv)))


# ---- parsing and prompts ------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "n", "ranking"), [
    ("2,0,3,1", 4, [2, 0, 3, 1]),
    ("2 > 0 > 3 > 1", 4, [2, 0, 3, 1]),
    ("[2, 0, 3, 1]", 4, [2, 0, 3, 1]),
    ("Having read all four, my ranking is 2, 0, 3, 1. Candidate 2 is the clearest.", 4,
     [2, 0, 3, 1]),
    ("Candidate 1 > Candidate 0 > Candidate 2", 3, [1, 0, 2]),
    ("1\n0", 2, [1, 0]),
])
def test_rankings_are_found_in_prose(answer, n, ranking):
    assert parse_ranking(answer, n) == ranking


@pytest.mark.parametrize(("answer", "n", "reason"), [
    ("2,0", 3, "no ranking of all 3"),        # partial
    ("0,0,1", 3, "no ranking of all 3"),      # repeated
    ("3,0,1,2", 3, "no ranking of all 3"),    # out of range
    ("2=0>1", 3, "no ranking of all 3"),      # a tie
    ("1,0 or perhaps 0,1", 2, "ambiguous"),   # two different rankings: never pick one
    ("The second one is better.", 2, "no ranking of all 2"),
])
def test_malformed_answers_are_refused(answer, n, reason):
    with pytest.raises(ValueError, match=reason):
        parse_ranking(answer, n)


def test_template_placeholders_fill_once_and_are_required(tmp_path):
    text = render_prompt("{n}: {prompt} | {candidates}", "Q {n}?", ["a {prompt}", "b"])
    assert text == "2: Q {n}? | [0]\na {prompt}\n\n[1]\nb"
    chat = render_prompt(DEFAULT_TEMPLATE, [{"role": "user", "content": "hi"}], ["x", "y"])
    assert "user: hi" in chat and "[1]\ny" in chat
    bad = tmp_path / "t.txt"
    bad.write_text("Rank these: {candidates}")
    with pytest.raises(ConfigError, match="no {prompt} placeholder"):
        load_template(bad)


# ---- a local judge ------------------------------------------------------------------------


@pytest.fixture
def items(tmp_path):
    rows = [{"prompt": "Which is kinder?", "candidates": ["You are rude.", "Thank you!"],
             "id": "a"},
            {"prompt": [{"role": "user", "content": "Greet me."}],
             "candidates": ["Hello there.", "Go away.", "Hello there."]}]
    return write_jsonl(tmp_path / "candidates.jsonl", rows)


def test_garbage_judge_leaves_items_unjudged_after_retries(tmp_path, tiny_model_dir, items):
    """A random tiny model answers noise: every item is asked 1 + 2 times, then recorded as
    unjudged with its three raw answers; no pair is made up."""
    out = tmp_path / "pairs.jsonl"
    assert run_cli(["--input", items, "--output", str(out), "--judge-model",
                    str(tiny_model_dir), "--retries", "2", "--max-new-tokens", "8"]) == 0
    assert out.read_text() == ""
    records = lines(tmp_path / "pairs.judgments.jsonl")
    assert [r["status"] for r in records] == ["unjudged", "unjudged"]
    assert all(len(r["answers"]) == 3 and len(r["errors"]) == 3 for r in records)
    assert all(r["ranking"] is None for r in records)
    assert sorted(records[1]["shown"]) == [0, 1]  # the repeated candidate is shown once


def rigged_judge(tokenizer, path):
    """A Llama whose layers add nothing (o_proj and down_proj zero), so each next token is
    a function of the current token alone, set by hand: end of the judge prompt -> "1" ->
    "," -> "0" -> EOS. Greedy decoding answers "1,0" to any two-candidate item."""
    model = build_model(tokenizer, arch="llama", num_layers=1)
    prompt = [{"role": "user", "content": render_prompt(DEFAULT_TEMPLATE, "p", ["a", "b"])}]
    last = render_prompts(tokenizer, [prompt])[0][-1]
    chain = [last, *tokenizer.convert_tokens_to_ids(["1", ",", "0"]), tokenizer.eos_token_id]
    assert len(set(chain)) == 5
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (current, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[current, slot] = 1.0
            model.lm_head.weight[following, slot] = 10.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_local_judge_label_probs_are_batched_and_equal_one_at_a_time(tmp_path, tokenizer, arch):
    """Prompts of different lengths, left-padded into batches of 4: the verdict
    probabilities are each prompt's own forward's, in two forwards instead of six."""
    from prefalign.preferences.local_judge import LocalJudge

    build_model(tokenizer, arch=arch, seed=3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = LocalJudge(str(tmp_path), batch_size=4)
    texts = ["a", "The film was a delight from start to finish.", "b c", "Good great excellent",
             "I found the plot slow and the acting wooden; the ending made no sense.", "x y z"]
    calls = []
    judge.model.register_forward_hook(lambda *_: calls.append(1))
    batched = judge.label_probs(texts)
    assert len(calls) == 2
    labels = [judge._label_token(label) for label in ("0", "1")]
    ids = render_prompts(judge.tokenizer, [[{"role": "user", "content": t}] for t in texts])
    with torch.no_grad():
        for prompt, probs in zip(ids, batched):
            logits = judge.model(torch.tensor([prompt])).logits[0, -1, labels]
            assert probs == pytest.approx(torch.softmax(logits, -1).tolist(), abs=1e-5)


def test_rigged_local_judge_ranks_and_writes_pairs(tmp_path, tokenizer, items):
    judge_dir = rigged_judge(tokenizer, tmp_path / "judge")
    out = tmp_path / "pairs.jsonl"
    assert run_cli(["--input", items, "--output", str(out), "--judge-model", judge_dir,
                    "--retries", "0", "--max-new-tokens", "6"]) == 0
    records = lines(tmp_path / "pairs.judgments.jsonl")
    assert [r["answers"] for r in records] == [["1,0"], ["1,0"]]
    # "1,0" names the second candidate shown; the shown order is shuffled per item.
    assert [r["ranking"] for r in records] == [r["shown"][::-1] for r in records]
    texts = [["You are rude.", "Thank you!"], ["Hello there.", "Go away."]]
    pairs = lines(out)
    best, worst = records[0]["ranking"]
    assert pairs[0] == {"prompt": "Which is kinder?", "chosen": texts[0][best],
                        "rejected": texts[0][worst], "source": f"judge:{judge_dir}", "id": "a",
                        "rank_chosen": 1, "rank_rejected": 2}
    best, worst = records[1]["ranking"]
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (texts[1][best], texts[1][worst])
    features, _ = load_preferences(str(out), tokenizer)
    assert len(features) == 2


# ---- an OpenAI-compatible endpoint --------------------------------------------------------


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_http_judge_retries_records_and_keeps_the_key_secret(tmp_path, monkeypatch, capsys,
                                                            caplog, no_proxy):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("JUDGE_KEY", KEY)
    server = ScriptedServer({
        "valid": [(200, "Ranking: [2, 0, 1]")],
        "late": [(200, "The first is best."), (200, "1 > 0 > 2")],
        "never": [(200, "0,0,1"), (200, "2,0"), (200, "no idea")],
        "crash": [(500, ""), (200, "0,1,2")],
        "busy": [(429, ""), (429, ""), (200, "2,1,0")],
    })
    cases = ["valid", "late", "never", "crash", "busy"]
    rows = [{"prompt": f"Question {i}", "candidates": [f"{c} A", f"{c} B", f"{c} C"]}
            for i, c in enumerate(cases)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    try:
        assert run_cli(["--input", data, "--output", str(out), "--judge-url", server.url,
                        "--judge-model", "judge-7b", "--api-key-env", "JUDGE_KEY",
                        "--retries", "2", "--batch-size", "2", "--workers", "2"]) == 0
    finally:
        server.close()
    records = lines(tmp_path / "pairs.judgments.jsonl")
    assert [r["status"] for r in records] == ["judged", "judged", "unjudged", "judged", "judged"]
    assert [len(r["answers"]) for r in records] == [1, 2, 3, 1, 1]
    assert records[2]["answers"] == ["0,0,1", "2,0", "no idea"] and records[2]["ranking"] is None
    # Each answer names positions in the item's shuffled order, mapped back to candidates.
    answered = {0: [2, 0, 1], 1: [1, 0, 2], 3: [0, 1, 2], 4: [2, 1, 0]}
    for k, order in answered.items():
        assert records[k]["ranking"] == [records[k]["shown"][i] for i in order]
    assert len({tuple(r["shown"]) for r in records}) > 1  # not one fixed order for all
    pairs = lines(out)
    assert len(pairs) == 4 * 3 and {p["source"] for p in pairs} == {"judge:judge-7b"}
    a, b, c = ("valid " + "ABC"[i] for i in records[0]["ranking"])
    assert [(p["chosen"], p["rejected"]) for p in pairs[:3]] == [(a, b), (a, c), (b, c)]
    assert not any("never" in p["chosen"] for p in pairs)
    # 1 + 2 + 3 + (1 + 1) + (2 + 1) requests; the sampled retries ask with retry_temperature.
    assert len(server.requests) == 11
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in server.requests} == {f"Bearer {KEY}"}
    assert {r["body"]["model"] for r in server.requests} == {"judge-7b"}
    assert sorted({r["body"]["temperature"] for r in server.requests}) == [0.0, 0.7]
    printed = capsys.readouterr()
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    for where in (written, printed.out, printed.err, caplog.text):
        assert KEY not in where and "7f3a9c1e" not in where


def test_http_errors_name_the_problem_but_never_the_key(monkeypatch, no_proxy):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    server = ScriptedServer({"x": [(401, "")]})
    try:
        judge = HttpJudge(server.url, "m", api_key_env="JUDGE_KEY")
        with pytest.raises(PrefalignError, match=r"HTTP 401 .*check the key in \$JUDGE_KEY") as e:
            judge(["x"], 0)
        assert KEY not in str(e.value) and KEY not in repr(judge)
    finally:
        server.close()
    closed = HttpJudge(server.url, "m", api_key_env="JUDGE_KEY", network_retries=2,
                       backoff=0.01, timeout=2)
    with pytest.raises(PrefalignError, match="no answer after 3 tries") as e:
        closed(["x"], 0)
    assert KEY not in str(e.value)
    assert closed._delay(3, None) == pytest.approx(0.04) and closed._delay(1, "2") == 2.0


def test_redirects_are_not_followed(monkeypatch, no_proxy):
    """A redirect would carry the Authorization header to another host."""
    monkeypatch.setenv("JUDGE_KEY", KEY)
    elsewhere = ScriptedServer({"x": [(200, "0,1")]})

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(307)
            self.send_header("Location", elsewhere.url + "/chat/completions")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        judge = HttpJudge(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "m",
                          api_key_env="JUDGE_KEY")
        with pytest.raises(PrefalignError, match="HTTP 307"):
            judge(["x"], 0)
        assert elsewhere.requests == []
    finally:
        httpd.shutdown()
        httpd.server_close()
        elsewhere.close()


# ---- resume -------------------------------------------------------------------------------


def test_judging_resumes_without_duplicates(tmp_path):
    rows = [{"prompt": f"q{i}", "candidates": [f"a{i}", f"b{i}"]} for i in range(5)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(KeyboardInterrupt):
        judge_preferences(data, out, ScriptedJudge(fail_at=3), batch_size=1, progress=False)
    assert len(lines(out)) == 2
    report = judge_preferences(data, out, ScriptedJudge(), batch_size=2, progress=False)
    assert report.items_done_before == 2 and report.status == {"judged": 3}
    assert [p["prompt"] for p in lines(out)] == [f"q{i}" for i in range(5)]
    assert [r["index"] for r in lines(tmp_path / "pairs.judgments.jsonl")] == list(range(5))
