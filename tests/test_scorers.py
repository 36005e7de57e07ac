"""Scorers: every built-in by hand, spec parsing, combinations, import paths, reward models."""

import argparse
import os
import sys
import textwrap
import time
import types

import numpy as np
import pytest

from prefalign.errors import ConfigError, PrefalignError
from prefalign.scoring import (
    BUILTINS,
    SCORER_HELP,
    Command,
    FunctionScorer,
    RewardModelScorer,
    TextPrompts,
    WeightedSum,
    batched,
    extract_code,
    load_scorer,
    parse_spec,
)


def score(spec, responses, prompts=None, **options):
    scorer = load_scorer(spec, **options)
    return scorer(prompts or [""] * len(responses), responses)


# --- built-ins --------------------------------------------------------------------------


def test_length_bounds_count_stripped_characters():
    # "  ab " strips to 2 chars < min 3; "abc" and "abcde" sit on the bounds; 6 > max 5.
    assert score("length(min=3,max=5)", ["  ab ", "abc", "abcde", "abcdef"]) == [0, 1, 1, 0]
    assert score("length(min=2)", ["a", "ab", "x" * 1000]) == [0, 1, 1]
    assert score("length(max=2)", ["", "ab", "abc"]) == [1, 1, 0]


def test_length_falloff_is_linear_outside_the_bounds():
    """falloff=4, bounds [3, 5]: 7 chars are 2 over -> 1 - 2/4 = 0.5; 1 char is 2 under ->
    0.5; 9 chars are 4 over -> 0.0; 6 chars -> 0.75."""
    got = score("length(min=3,max=5,falloff=4)", ["abcdefg", "a", "x" * 9, "x" * 6, "abcd"])
    assert got == [0.5, 0.5, 0.0, 0.75, 1.0]


@pytest.mark.parametrize("spec", ["length", "length(min=5,max=2)", "length(max=3,falloff=-1)"])
def test_length_rejects_meaningless_bounds(spec):
    with pytest.raises(ConfigError, match="length"):
        load_scorer(spec)


def test_regex_must_and_must_not_match():
    responses = ['{"a": 1}', "text {", "ABC"]
    assert score("regex(pattern='^\\{')", responses) == [1, 0, 0]
    assert score("regex(pattern='^\\{',must=false)", responses) == [0, 1, 1]
    assert score("regex(pattern=abc)", responses) == [0, 0, 0]
    assert score("regex(pattern=abc,ignore_case=true)", responses) == [0, 0, 1]


def test_regex_quoted_pattern_may_hold_commas_and_parentheses():
    assert score("regex(pattern='^\\d{1,3}$')", ["123", "1234", "12a"]) == [1, 0, 0]
    assert score('regex(pattern="\\(a")', ["(a", "a"]) == [1, 0]  # an unbalanced "("
    assert score("regex(pattern=(yes|ok))", ["ok then", "no"]) == [1, 0]


def test_regex_errors_name_the_pattern():
    with pytest.raises(ConfigError, match=r"invalid pattern '\(a'"):
        load_scorer("regex(pattern='(a')")
    with pytest.raises(ConfigError, match="give pattern"):
        load_scorer("regex")


def test_json_valid_whole_response_or_an_embedded_block():
    responses = [
        '{"a": 1}',                      # whole
        "  [1, 2] ",                     # whole, surrounding space ignored
        "42",                            # a bare JSON number is JSON
        'Sure: {"a": 1} done',           # a block in prose
        'See [note]: {"a": [1]}',        # the first bracket fails, the second opens JSON
        '```json\n{"a": [1]}\n```',      # a fenced block
        '{"a": 1,}',                     # trailing comma
        "NaN",                           # Python's json accepts it, JSON does not
        '{"a": NaN}',
        "",
        "{not json}",
    ]
    assert score("json_valid", responses) == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert score("json_valid(extract=false)", responses[:5]) == [1, 1, 1, 0, 0]


def test_extract_code_prefers_python_fences_then_untagged_then_everything():
    assert extract_code("```\nA\n```\ntext\n```python\nB\n```") == "B\n"
    assert extract_code("```bash\nls\n```\n```\nA\n```") == "A\n"
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\nx = 1") == "x = 1"  # truncated generation
    assert extract_code("x = 1\ny = 2") == "x = 1\ny = 2"


def test_python_compiles_checks_syntax_of_the_extracted_code():
    responses = [
        "x = 1",
        "def f(:\n    pass",
        "Here it is:\n```python\ndef f():\n    return 1\n```\nDone.",
        "Here it is:\n```python\ndef f(\n```",
        "Here it is: x = 1",                 # prose is not code
        "```bash\nls -l\n```",               # no python block: the whole response
        "",
        "   \n",
        "s = '\\d'",                         # an invalid escape warns but compiles
    ]
    assert score("python_compiles", responses) == [1, 0, 1, 0, 0, 0, 0, 0, 1]


def test_python_compiles_never_executes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "open('executed', 'w').write('x')\nraise SystemExit(3)"
    assert score("python_compiles", [code]) == [1.0]
    assert not (tmp_path / "executed").exists()


# --- the command scorer -------------------------------------------------------------------


def test_command_scores_exit_status_of_a_real_run(capfd):
    scorer = load_scorer("command(cmd='python {file}',timeout=20)")
    passing = "```python\nprint('hello from the response')\nassert 1 + 1 == 2\n```"
    failing = "assert 1 + 1 == 3"
    assert scorer(["p", "p"], [passing, failing]) == [1.0, 0.0]
    ok, bad = scorer.last_results
    assert ok.returncode == 0 and "hello from the response" in ok.output
    assert bad.returncode == 1 and "AssertionError" in bad.output
    assert capfd.readouterr().out == ""  # output is captured, not printed


def test_command_runs_in_a_clean_directory_with_the_prompt_file():
    code = textwrap.dedent("""
        import os, sys
        assert sorted(os.listdir(".")) == ["prompt.txt", "solution.py"], os.listdir(".")
        assert open(sys.argv[1]).read() == open("prompt.txt").read() == "say 2"
        assert sys.executable == sys.argv[2]
    """)
    scorer = Command(cmd=f"python {{file}} {{prompt_file}} {sys.executable}", timeout=20)
    assert scorer(["say 2", "say 3"], [code, code]) == [1.0, 0.0]


def test_command_timeout_kills_the_process_group():
    code = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    scorer = Command(cmd="python {file}", timeout=1.5)
    assert scorer(["p"], [code]) == [0.0]
    result = scorer.last_results[0]
    assert result.returncode is None and not result.passed
    pid = int(result.output.split()[0])
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the grandchild outlived the timeout"


def test_command_kills_background_processes_after_a_normal_exit():
    code = textwrap.dedent("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(child.pid)
    """)
    scorer = Command(cmd="python {file}", timeout=20)
    assert scorer(["p"], [code]) == [1.0]
    pid = int(scorer.last_results[0].output.split()[0])
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "a background process outlived the scoring"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_command_uses_no_shell_unless_asked():
    # Without a shell "; exit 3" are three more arguments to the script, which exits 0.
    assert score("command(cmd='python {file} ; exit 3')", ["x = 1"]) == [1.0]
    assert score("command(cmd='python {file} ; exit 3',shell=true)", ["x = 1"]) == [0.0]


def test_command_workers_keep_the_order():
    codes = ["pass", "raise SystemExit(1)", "pass", "raise SystemExit(2)"]
    assert score("command(workers=3)", codes) == [1, 0, 1, 0]


def test_command_missing_program_is_a_config_error():
    with pytest.raises(ConfigError, match="no-such-program-xyz"):
        score("command(cmd='no-such-program-xyz {file}')", ["x"])
    with pytest.raises(ConfigError, match="timeout"):
        load_scorer("command(timeout=0)")


# --- combinations and spec syntax ---------------------------------------------------------


def test_weighted_sum_arithmetic():
    """length(max=3):0.5 + regex(a):2 + json_valid:1 (no weight counts 1):
    "a"    -> 0.5*1 + 2*1 + 1*0 = 2.5
    "abcd" -> 0.5*0 + 2*1 + 1*0 = 2.0
    "[1]"  -> 0.5*1 + 2*0 + 1*1 = 1.5"""
    scorer = load_scorer("length(max=3):0.5, regex(pattern=a):2, json_valid")
    assert isinstance(scorer, WeightedSum)
    assert scorer(["", "", ""], ["a", "abcd", "[1]"]) == [2.5, 2.0, 1.5]
    names = [(name, weight) for name, weight, _ in scorer.components([""], ["a"])]
    assert names == [("length(max=3)", 0.5), ("regex(pattern=a)", 2.0), ("json_valid", 1.0)]


def test_single_weighted_term_and_negative_weights():
    assert score("length(max=3):2", ["ab", "abcd"]) == [2.0, 0.0]
    assert score("regex(pattern=TODO):-1,length(max=100):1e-1", ["TODO", "ok"]) == [-0.9, 0.1]


def test_parse_spec_terms_params_and_weights():
    terms = parse_spec("mod.sub:fn(k=1,s='a,b'):2.5,length(max=3)")
    assert [(t.target, t.params, t.weight) for t in terms] == [
        ("mod.sub:fn", {"k": "1", "s": "a,b"}, 2.5),
        ("length", {"max": "3"}, None),
    ]
    # An apostrophe inside an unquoted value does not open a quote.
    assert parse_spec("regex(pattern=don't)")[0].params == {"pattern": "don't"}


@pytest.mark.parametrize("spec, message", [
    ("lenght", "unknown scorer 'lenght'; use one of " + ", ".join(BUILTINS)),
    ("length(mx=3)", "unknown parameter 'mx'; it takes min, max, falloff"),
    ("length(max=three)", "length: max must be int, got 'three'"),
    ("json_valid(extract=maybe)", "extract must be bool"),
    ("python_compiles(x=1)", "it takes none"),
    ("length(max=3", "unclosed ("),
    ("length(max=3),", "empty term"),
    ("regex(pattern='abc)", "unclosed '"),
    ("length(max=3, max=4)", "given twice"),
    ("length(3)", "'3' is not key=value"),
    ("", "empty scorer spec"),
    ("./no/such/dir", "no such reward-model directory"),
])
def test_spec_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ConfigError) as err:
        load_scorer(spec)
    assert message in str(err.value)


@pytest.mark.parametrize("spec, closest", [
    ("length(mx=3)", "max"),
    ("regex(patern=a)", "pattern"),
    ("json_valid(extrct=false)", "extract"),
    ("command(timout=5)", "timeout"),
])
def test_a_typo_in_a_builtin_parameter_names_the_closest_one(spec, closest):
    with pytest.raises(ConfigError) as err:
        load_scorer(spec)
    assert f"did you mean {closest!r}?" in str(err.value)
    assert "\n" not in str(err.value)


def test_options_are_parameters_of_a_single_term():
    assert score("length", ["abcd"], max=3) == [0.0]
    with pytest.raises(ConfigError, match="given both"):
        load_scorer("length(max=3)", max=4)
    with pytest.raises(ConfigError, match="combines terms"):
        load_scorer("length(max=3),json_valid", extract=False)
    with pytest.raises(ConfigError, match="must be bool"):
        load_scorer("json_valid", extract="yes please")


def test_scorer_help_lists_every_builtin_and_is_argparse_safe():
    for name in BUILTINS:
        assert name in SCORER_HELP
    parser = argparse.ArgumentParser()
    parser.add_argument("--scorer", help=SCORER_HELP)
    assert "json_valid" in parser.format_help()  # a stray '%' would raise here


# --- import paths and plain functions -----------------------------------------------------

RULES = '''
from prefalign.scoring import ItemScorer, batched

def has_word(prompt, response, word="yes"):
    return word in response

@batched
def lengths(prompts, responses, scale=1):
    return [scale * len(r) for r in responses]

def short_batch(prompts, responses):
    return [1.0]
short_batch.batched = True

def words(prompt, response):
    return "high"

def not_finite(prompt, response):
    return float("nan")

def forgot_batched(prompts, responses):
    return [1.0 for _ in responses]

@batched
def one_number(prompts, responses):
    return 1.0

class Echo(ItemScorer):
    def __init__(self, scale=1.0):
        self.scale = scale
    def score_one(self, prompt, response):
        return self.scale * len(prompt)

READY = Echo(2.0)
VALUE = 3
'''


@pytest.fixture
def rules(tmp_path, monkeypatch):
    """A module `scorer_rules_mod` importable from tmp_path, forgotten afterwards."""
    (tmp_path / "scorer_rules_mod.py").write_text(RULES)
    (tmp_path / "scorer_broken_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "scorer_rules_mod"
    for name in ("scorer_rules_mod", "scorer_broken_mod"):
        sys.modules.pop(name, None)


def test_import_path_per_item_batched_and_classes(rules):
    assert score(f"{rules}:has_word", ["yes sir", "no"]) == [1.0, 0.0]  # bools are numbers
    assert score(f"{rules}:has_word(word=no)", ["yes sir", "no"]) == [0.0, 1.0]
    assert score(f"{rules}:lengths(scale=2)", ["ab", "abc"]) == [4.0, 6.0]
    assert score(f"{rules}:Echo(scale=0.5)", ["x", "y"], prompts=["abcd", ""]) == [2.0, 0.0]
    assert score(f"{rules}:READY", ["x"], prompts=["abc"]) == [6.0]
    assert score(f"{rules}:lengths:0.5,length(max=2)", ["ab", "abc"]) == [2.0, 1.5]
    # Quoted values stay strings: "2" * len gives text, which the check rejects.
    with pytest.raises(PrefalignError, match="returned a str"):
        score(f"{rules}:lengths(scale='2')", ["ab"])


@pytest.mark.parametrize("attr, message", [
    ("short_batch", "returned 1 scores for 2 responses"),
    ("words", "returned a str ('high') at position 0; scores are numbers"),
    ("not_finite", "returned nan at position 0; scores must be finite"),
    ("forgot_batched", "needs `batched = True`"),
    ("one_number", "marked batched = True but returned a float"),
])
def test_import_path_wrong_results_raise_clear_errors(rules, attr, message):
    scorer = load_scorer(f"{rules}:{attr}")
    with pytest.raises(PrefalignError) as err:
        scorer(["p", "q"], ["a", "b"])
    assert message in str(err.value) and attr in str(err.value)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("scorer_broken_mod:fn", "importing module 'scorer_broken_mod' failed: RuntimeError: boom"),
    ("scorer_rules_mod:nope", "has no attribute 'nope' (its callables: Echo, ItemScorer"),
    ("scorer_rules_mod:VALUE", "is a int, not a function"),
    ("scorer_rules_mod:has_word(wordd=x)", "unexpected keyword argument 'wordd'"),
    ("scorer_rules_mod:READY(scale=1)", "takes no parameters"),
    (":fn", "module.path:function"),
])
def test_bad_import_paths_name_what_failed(rules, spec, message):
    with pytest.raises(ConfigError) as err:
        load_scorer(spec)
    assert message in str(err.value)


def test_plain_callables_and_array_results():
    assert load_scorer(lambda p, r: len(r))(["", ""], ["a", "bcd"]) == [1.0, 3.0]
    arrays = batched(lambda ps, rs: np.array([len(r) for r in rs], dtype=np.float32))
    assert load_scorer(arrays)(["", ""], ["a", "bc"]) == [1.0, 2.0]
    scorer = FunctionScorer(lambda p, r: 1)
    assert scorer([], []) == []
    with pytest.raises(PrefalignError, match="2 prompts but 1 responses"):
        scorer(["a", "b"], ["c"])


# --- reward-model directories -------------------------------------------------------------


class FakeRewardScorer:
    calls = []

    def __init__(self, model, tokenizer=None, batch_size=8):
        self.calls.append((model, tokenizer, batch_size))

    def score(self, prompts, responses):
        return [float(len(p) + len(r)) for p, r in zip(prompts, responses)]


@pytest.fixture
def reward_dir(tmp_path, monkeypatch):
    fake = types.ModuleType("prefalign.scoring.reward_model")
    fake.RewardScorer = FakeRewardScorer
    monkeypatch.setitem(sys.modules, "prefalign.scoring.reward_model", fake)
    FakeRewardScorer.calls = []
    path = tmp_path / "rm"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return str(path)


def test_reward_model_directory_dispatches_to_reward_scorer(reward_dir):
    scorer = load_scorer(reward_dir, tokenizer="tok")
    assert isinstance(scorer, RewardModelScorer)
    assert scorer(["ab", "c"], ["d", ""]) == [3.0, 1.0]
    assert FakeRewardScorer.calls == [(reward_dir, "tok", 8)]
    combined = load_scorer(f"{reward_dir}(batch_size=2):0.5,length(max=1)")
    assert combined(["ab"], ["d"]) == [0.5 * 3 + 1]
    assert FakeRewardScorer.calls[-1] == (reward_dir, None, 2)


def test_reward_model_parameters_are_typed(reward_dir):
    """A reward model's spec parameters are RewardScorer's, converted to their types; a typo
    names the closest one instead of failing inside RewardScorer."""
    load_scorer(f"{reward_dir}(batch_size=3)")(["a"], ["b"])
    assert FakeRewardScorer.calls[-1] == (reward_dir, None, 3)
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_scorer(f"{reward_dir}(batch_sise=3)")
    with pytest.raises(ConfigError, match="batch_size must be int, got 'many'"):
        load_scorer(f"{reward_dir}(batch_size=many)")


def test_reward_model_directory_with_odd_characters(reward_dir, tmp_path):
    odd = tmp_path / "rm,v1:2"
    os.rename(reward_dir, odd)
    assert load_scorer(str(odd))(["a"], ["b"]) == [2.0]


def test_reward_model_errors(reward_dir, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_scorer(str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "prefalign.scoring.reward_model", None)
    with pytest.raises(PrefalignError, match="prefalign.scoring.reward_model is not available"):
        load_scorer(reward_dir)


class TemplateTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_text_prompts_render_chat_prompts_before_scoring():
    """ppo and evaluate score chat prompts as their rendered template text; text prompts
    and the rows' columns pass through unchanged."""
    seen = []

    def fn(prompts, completions, tag):
        seen.append((prompts, tag))
        return [float(len(p)) for p in prompts]

    scorer = TextPrompts(load_scorer(fn), TemplateTokenizer())
    chat = [{"role": "user", "content": "Hi"}]
    # len("<user>Hi<assistant>") = 6 + 2 + 11 = 19; len("plain") = 5
    assert scorer([chat, "plain"], ["a", "b"], {"tag": ["x", "y"]}) == [19.0, 5.0]
    assert seen == [(["<user>Hi<assistant>", "plain"], ["x", "y"])]
