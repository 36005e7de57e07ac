"""Reward functions as users write them: a file in the working directory named as a module
or by its path, in our (prompt, response) form or TRL's (prompts, completions, **kwargs)
form with the data's other columns, run through the command line from that directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_jsonl
from prefalign.cli import main

OURS = '''
def is_polite(prompt, response):
    return float("please" in response) + len(response) / 1000
'''

# TRL's GRPOTrainer form: batched, completions by keyword, other columns as keywords.
TRL = '''
def match_answer(prompts, completions, answer, **kwargs):
    assert set(kwargs) == {"id", "origin_note"}, sorted(kwargs)
    return [len(a) + len(c) / 1000 for c, a in zip(completions, answer)]
'''

ROWS = [{"prompt": "The film", "answer": "abc", "id": 1, "origin_note": "x"},
        {"prompt": "Hi there", "answer": "z", "id": 2, "origin_note": "y"}]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """tmp_path as the working directory, holding the reward files and the prompts; the
    modules imported from it are forgotten afterwards."""
    (tmp_path / "my_rewards.py").write_text(OURS)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "trl_rewards.py").write_text(TRL)
    write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    path = list(sys.path)
    yield tmp_path
    assert sys.path == path  # the working directory was on the path only while importing
    for name in [n for n in sys.modules if n == "my_rewards" or n.startswith("_prefalign_scorer_")]:
        del sys.modules[name]


def generate(scorer, model, out="pairs.jsonl"):
    return main(["generate", "--model", str(model), "--data", "prompts.jsonl", "--scorer",
                 scorer, "--output", out, "--num-candidates", "3", "--max-new-tokens", "4",
                 "--keep-candidates", "--seed", "1"])


def candidates(workdir, out="pairs.jsonl"):
    path = workdir / out.replace(".jsonl", ".candidates.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("spec", ["my_rewards:is_polite", "./my_rewards.py:is_polite",
                                  "my_rewards.py:is_polite", "ABSOLUTE"])
def test_our_form_from_the_working_directory_or_a_path(workdir, tiny_model_dir, spec):
    spec = f"{workdir / 'my_rewards.py'}:is_polite" if spec == "ABSOLUTE" else spec
    assert generate(spec, tiny_model_dir) == 0
    rows = candidates(workdir)
    assert len(rows) == 2
    for row in rows:
        want = [float("please" in c) + len(c) / 1000 for c in row["candidates"]]
        assert row["scores"] == pytest.approx(want)


def test_trl_form_gets_the_rows_other_columns(workdir, tiny_model_dir):
    assert generate("sub/trl_rewards.py:match_answer", tiny_model_dir) == 0
    rows = candidates(workdir)
    answers = {r["prompt"]: r["answer"] for r in ROWS}
    for row in rows:
        want = [len(answers[row["prompt"]]) + len(c) / 1000 for c in row["candidates"]]
        assert row["scores"] == pytest.approx(want)


def ppo(reward_fn, model, out="ppo"):
    return main(["ppo", "--model", str(model), "--data", "prompts.jsonl", "--reward-fn",
                 reward_fn, "--output-dir", out, "--max-steps", "1", "--batch-size", "2",
                 "--grad-accum", "1", "--max-new-tokens", "4", "--lora-r", "4",
                 "--logging-steps", "1", "--ppo-epochs", "1"])


@pytest.mark.parametrize("spec, form", [("my_rewards:is_polite", "ours"),
                                        ("./sub/trl_rewards.py:match_answer", "trl")])
def test_ppo_reward_fn_in_both_forms(workdir, tiny_model_dir, spec, form):
    assert ppo(spec, tiny_model_dir) == 0
    samples = [json.loads(line)
               for line in (workdir / "ppo" / "samples.jsonl").read_text().splitlines()]
    answers = {r["prompt"]: r["answer"] for r in ROWS}
    assert len(samples) == 2
    for s in samples:
        r = s["response"]
        want = (float("please" in r) + len(r) / 1000 if form == "ours"
                else len(answers[s["prompt"]]) + len(r) / 1000)
        assert s["score"] == pytest.approx(want)


BAD = {
    "wrong_length": "def f(prompts, completions, **kwargs):\n    return [1.0]\n",
    "text": "def f(prompts, completions, **kwargs):\n    return ['high' for _ in completions]\n",
    "none": "def f(prompts, completions, **kwargs):\n"
            "    return [None] + [1.0] * (len(completions) - 1)\n",
    "one_number": "def f(prompts, completions, **kwargs):\n    return 1.0\n",
    "neither": "def f(text):\n    return 1.0\n",
    "needs_column": "def f(prompts, completions, ground_truth, **kwargs):\n"
                    "    return [1.0] * len(completions)\n",
    "not_callable": "f = 3\n",
}


@pytest.mark.parametrize("spec, message", [
    ("nowhere_mod:f", "cannot import module 'nowhere_mod': it is neither in the working "
                      "directory (no {cwd}/nowhere_mod.py) nor on the Python path"),
    ("./nowhere.py:f", "no file {cwd}/nowhere.py"),
    ("bad_wrong_length:g", "module 'bad_wrong_length' has no attribute 'g' (its callables: f)"),
    ("./bad_not_callable.py:f", "is a int, not a function"),
    ("bad_neither:f", "its signature (text) fits no reward-function form"),
    ("bad_wrong_length:f", "returned 1 scores for 6 responses"),
    ("bad_text:f", "returned a str ('high') at position 0; scores are numbers"),
    ("bad_none:f", "returned None at position 0 (no reward for that response)"),
    ("bad_one_number:f", "returned a float (1.0); it must return a list with one number"),
    ("bad_needs_column:f", "needs 'ground_truth', which is not a column of the prompt rows "
                           "(their other columns: answer, id, origin_note)"),
])
def test_errors_are_one_line_naming_the_cause(workdir, tiny_model_dir, capsys, spec, message):
    for name, code in BAD.items():
        (workdir / f"bad_{name}.py").write_text(code)
    assert generate(spec, tiny_model_dir) == 2
    # stderr also holds progress bars (loading, sampling); the error is one line after them.
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("prefalign: error: "), lines
    err = lines[0]
    assert message.format(cwd=os.path.realpath(workdir)) in err or \
        message.format(cwd=workdir) in err, err
    assert not (workdir / "pairs.jsonl").exists() or not (workdir / "pairs.jsonl").read_text()
    for name in list(sys.modules):
        if name.startswith("bad_"):
            del sys.modules[name]


def test_readme_command_from_the_shell(workdir, tiny_model_dir):
    """The installed `prefalign` script, run in the directory that holds my_rewards.py,
    without PYTHONPATH."""
    script = Path(sys.executable).with_name("prefalign")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(script), "ppo", "--model", str(tiny_model_dir), "--reward-fn",
         "my_rewards:is_polite", "--data", "prompts.jsonl", "--output-dir", "ppo",
         "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "2",
         "--lora-r", "4", "--ppo-epochs", "1"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (workdir / "ppo" / "final").is_dir()
