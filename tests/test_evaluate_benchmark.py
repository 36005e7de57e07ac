"""evaluate()'s benchmark mode: reference answers and test commands on a tiny model."""

import argparse
import json
from types import SimpleNamespace

import pytest

from helpers import write_jsonl
from prefalign.config import add_config_arguments, config_from_args
from prefalign.errors import ConfigError, DataError
from prefalign.evaluation import evaluate
from prefalign.evaluation.command import EvaluateConfig
from prefalign.generation import SamplingConfig, generate
from prefalign.models import load_causal_lm, load_tokenizer
from prefalign.scoring.answer_check import last_number

GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0, n=1, seed=0, batch_size=8)
TEXTS = ["The film 1:", "Count: 3, 4,", "Hello there", "def add(a, b):", "x =", "print("]
PASS = "python -c \"import os, sys; sys.exit(0 if os.path.isfile('solution.py') else 3)\""
FAIL = "python -c \"raise SystemExit(1)\""
SLOW = "python -c \"import time; time.sleep(30)\""


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    """Three rows with answers (one right by construction, two wrong) and three with tests
    (one passes, one fails, one runs past the timeout): accuracy 1/3, pass rate 1/3."""
    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    text = generate(model, tok, TEXTS[:1], GREEDY, progress=False)[0].text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the greedy response must have a line to answer with"
    right = last_number(text) if last_number(text) is not None else lines[-1]
    answers = [right, "zq never generated qz", 987654321.5]
    return ([{"prompt": p, "answer": a} for p, a in zip(TEXTS[:3], answers)]
            + [{"prompt": p, "test": t} for p, t in zip(TEXTS[3:], (PASS, FAIL, SLOW))])


def test_accuracy_and_pass_rate_are_exact_with_intervals(rows, tiny_model_dir, tmp_path):
    res = evaluate({"base": str(tiny_model_dir)}, rows, tmp_path / "out", sampling=GREEDY,
                   scorer="math_answer", benchmark=True, benchmark_timeout=1.0,
                   bootstrap=200, progress=False)
    m = res.metrics["base"]
    assert m["benchmark/accuracy"] == pytest.approx(1 / 3)
    assert m["benchmark/pass_rate"] == pytest.approx(1 / 3)
    got = [(r["prompt_index"], r.get("benchmark_correct"), r.get("benchmark_passed"))
           for r in res.samples["base"]]
    assert got == [(0, 1.0, None), (1, 0.0, None), (2, 0.0, None),
                   (3, None, 1.0), (4, None, 0.0), (5, None, 0.0)]
    # the math_answer scorer read the same answer column: 1, 0, 0 on the answer rows
    assert [r["score"] for r in res.samples["base"][:3]] == [1.0, 0.0, 0.0]
    report = json.loads(res.paths["json"].read_text("utf-8"))
    for key in ("benchmark/accuracy", "benchmark/pass_rate"):
        ci = report["intervals"]["base"][key]
        assert ci["value"] == pytest.approx(1 / 3)
        assert 0.0 <= ci["ci95"][0] <= 1 / 3 <= ci["ci95"][1] <= 1.0
        assert ci["ci95"][0] < ci["ci95"][1]
        assert report["metric_info"][key]["label"] in ("accuracy", "pass rate")
    assert report["settings"]["benchmark"] == {"answers": 3, "tests": 3, "tests_not_run": 0,
                                               "timeout": 1.0}
    md = res.paths["md"].read_text("utf-8")
    assert "accuracy" in md and "pass rate" in md


def test_auto_mode_checks_answers_and_leaves_tests_unrun(rows, tiny_model_dir, tmp_path,
                                                          capsys):
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    res = evaluate({"base": str(tiny_model_dir)}, path, tmp_path / "out", sampling=GREEDY,
                   bootstrap=0, progress=False)
    assert res.metrics["base"]["benchmark/accuracy"] == pytest.approx(1 / 3)
    assert res.metrics["base"]["benchmark/pass_rate"] is None
    err = capsys.readouterr().err
    assert "3 prompts with an answer" in err and "3 test commands not run" in err
    off = evaluate({"base": str(tiny_model_dir)}, path, tmp_path / "off", sampling=GREEDY,
                   bootstrap=0, progress=False, benchmark=False)
    assert off.metrics["base"]["benchmark/accuracy"] is None
    assert off.report["settings"]["benchmark"] is None


def test_bad_benchmark_input_fails_before_sampling(tiny_model_dir, tmp_path):
    model = {"base": str(tiny_model_dir)}
    with pytest.raises(ConfigError, match="no row of --prompts has an 'answer'"):
        evaluate(model, ["a", "b"], tmp_path / "o", benchmark=True, progress=False)
    with pytest.raises(DataError, match="row 2: field 'test'"):
        evaluate(model, [{"prompt": "a", "test": "true"}, {"prompt": "b", "test": "'open"}],
                 tmp_path / "o", benchmark=True, progress=False)
    with pytest.raises(DataError, match="row 1: field 'answer' must be a number or text"):
        evaluate(model, [{"prompt": "a", "answer": [1, 2]}], tmp_path / "o", progress=False)
    argparser = argparse.ArgumentParser()
    add_config_arguments(argparser, EvaluateConfig)
    parser = SimpleNamespace(  # flags -> EvaluateConfig, as the command reads them
        parse_args=lambda argv: config_from_args(EvaluateConfig, argparser.parse_args(argv)))
    args = parser.parse_args(["--models", "m", "--prompts", "p", "--benchmark",
                              "--benchmark-timeout", "3"])
    assert args.benchmark is True and args.benchmark_timeout == 3.0
    assert parser.parse_args(["--models", "m", "--prompts", "p"]).benchmark is None
