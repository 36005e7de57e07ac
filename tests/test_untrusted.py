"""Untrusted files: no code runs from data, weights or configs; API keys stay secret.

A scan of the source refuses eval/exec, pickle-like modules, torch.load without
weights_only=True and remote code switched on by default. A whole pipeline (DPO, judge over
an OpenAI-compatible endpoint, evaluate, annotate) run with an API key in the environment
writes weights only as safetensors, pickles only plain state that loads with
weights_only=True, and never writes or prints the key."""

import argparse
import ast
import contextlib
import dataclasses
import io
import logging
from pathlib import Path

import pytest
import torch

from helpers import ScriptedServer, preference_rows, write_jsonl
from prefalign.cli import TRAINERS, build_parser, main

SRC = Path(__file__).parents[1] / "src" / "prefalign"
KEY = "sk-untrusted-5b1e0c7d-NEVER-WRITTEN"

# ---- the source scan ----------------------------------------------------------------------

# compile() alone is not here: it builds a code object without running it (the
# python_compiles scorer checks that a response parses); running one needs exec or eval.
RUNS_CODE = {"eval", "exec", "__import__"}
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}
UNSAFE_YAML = {"yaml.load", "yaml.load_all", "yaml.full_load", "yaml.unsafe_load",
               "yaml.unsafe_load_all"}
# The one module that writes pickles: optimizer, scheduler and RNG state of checkpoints,
# which it reads back with weights_only=True (tensors, numbers and strings only).
TORCH_SAVE_ALLOWED = "train/checkpoint.py"


def dotted(node):
    """`torch.load` for the call target torch.load(...), `?.from_pretrained` for
    Auto.from_pretrained(...), `eval` for eval(...)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def constant(node, value):
    return isinstance(node, ast.Constant) and node.value is value


def scan(source, where):
    """Every unsafe construct in `source` as 'where:line: what'."""
    found = []

    def flag(node, what):
        found.append(f"{where}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLERS:
                    flag(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLERS:
                flag(node, f"imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if name in RUNS_CODE:
                flag(node, f"calls {name}()")
            if name == "torch.load" and not constant(kw.get("weights_only"), True):
                flag(node, "torch.load without weights_only=True")
            if name == "torch.save" and not where.endswith(TORCH_SAVE_ALLOWED):
                flag(node, "torch.save (a pickle) outside " + TORCH_SAVE_ALLOWED)
            if name.endswith("from_pretrained") and any(
                    constant(kw.get(k), False) for k in ("use_safetensors", "weights_only")):
                flag(node, "from_pretrained reading pickled weights")
            if name in UNSAFE_YAML:
                flag(node, f"{name} (use yaml.safe_load)")
            for key in ("trust_remote_code", "allow_pickle"):
                if constant(kw.get(key), True):
                    flag(node, f"{key}=True")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d]
            for arg, default in pairs:
                if arg.arg == "trust_remote_code" and constant(default, True):
                    flag(node, "trust_remote_code defaults to True")
    return found


def test_the_scan_finds_each_unsafe_construct():
    """Each line below is one finding, so a clean source scan means something."""
    bad = [
        "eval(text)", "exec(code)", "import pickle", "from dill import loads",
        "import marshal", "torch.load(path)", "torch.load(path, weights_only=False)",
        "AutoModel.from_pretrained(p, use_safetensors=False)", "yaml.load(text)",
        "AutoModel.from_pretrained(p, trust_remote_code=True)",
        "def load(path, trust_remote_code=True): pass", "numpy.load(p, allow_pickle=True)",
        "torch.save(obj, path)",
    ]
    for line in bad:
        assert len(scan(line, "prefalign/x.py")) == 1, line
    fine = ["torch.load(p, weights_only=True)", "yaml.safe_load(t)", "compile(c, 'f', 'exec')",
            "model.eval()", "AutoModel.from_pretrained(p, trust_remote_code=flag)",
            "def load(path, trust_remote_code=False): pass"]
    assert scan("\n".join(fine), "prefalign/x.py") == []
    assert scan("torch.save(obj, path)", "prefalign/train/checkpoint.py") == []


def test_source_runs_no_code_from_data_and_reads_no_untrusted_pickle():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        found += scan(path.read_text("utf-8"), str(path.relative_to(SRC.parent)))
    assert found == []


# ---- trust_remote_code ----------------------------------------------------------------------


def test_trust_remote_code_is_off_unless_the_flag_is_given():
    import importlib

    parser = build_parser()
    for name, (module, config_name, _, _) in TRAINERS.items():
        cls = getattr(importlib.import_module(module), config_name)
        field = {f.name: f for f in dataclasses.fields(cls)}["trust_remote_code"]
        assert field.default is False, name
        assert getattr(parser.parse_args([name]), "trust_remote_code", False) is False, name
        assert parser.parse_args([name, "--trust-remote-code"]).trust_remote_code is True
    score = ["score", "--reward-model", "rm", "--data", "d"]
    evaluate = ["evaluate", "--models", "a=m", "--prompts", "p"]
    for argv in (score, evaluate):
        assert getattr(parser.parse_args(argv), "trust_remote_code", False) is False
        assert parser.parse_args([*argv, "--trust-remote-code"]).trust_remote_code is True
    # generate, judge and annotate have no such flag: their loaders keep the default False.
    for argv in (["generate", "--model", "m", "--data", "d", "--scorer", "s", "--output", "o"],
                 ["judge", "--input", "i", "--output", "o", "--judge-model", "m"]):
        assert not hasattr(parser.parse_args(argv), "trust_remote_code")


def all_flags(parser):
    """Every option string of `parser` and of its subcommands, recursively."""
    flags = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= all_flags(sub)
    return flags


def test_api_keys_come_only_from_the_environment():
    """No command takes a key on the command line (it would land in shell history and
    process lists); the judge takes the name of the variable that holds it."""
    words = {"key", "token", "secret", "password", "auth", "credentials"}
    secrets = {f for f in all_flags(build_parser()) if words & set(f.strip("-").split("-"))}
    assert secrets == {"--api-key-env"}


# ---- a whole pipeline with an API key in the environment ----------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir):
    """Run dpo (LoRA, checkpoints, --merge), judge, evaluate and annotate through the CLI
    with OPENAI_API_KEY set. -> (root folder of everything written, everything printed or
    logged, Authorization headers the endpoint received)."""
    root = tmp_path_factory.mktemp("pipeline")
    data = write_jsonl(root / "prefs.jsonl", preference_rows(8))
    candidates = write_jsonl(root / "candidates.jsonl",
                             [{"prompt": f"Q{i}", "candidates": [f"a{i}", f"b{i}"]} for i in range(3)])
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": "The film 1:"}])
    out, endpoint = root / "dpo", ScriptedServer({}, default=(200, "1,0"))
    printed, logged = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logged)
    logging.getLogger().addHandler(handler)
    previous_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    commands = [
        ["dpo", "--model", str(tiny_model_dir), "--data", data, "--output-dir", str(out),
         "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4",
         "--save-steps", "1", "--logging-steps", "1", "--merge"],
        ["judge", "--input", candidates, "--output", str(root / "judged.jsonl"),
         "--judge-url", endpoint.url, "--judge-model", "judge-1"],
        ["evaluate", "--models", f"dpo={out / 'final-merged'}", "--prompts", prompts,
         "--output-dir", str(root / "report"), "--max-new-tokens", "4", "--num-examples", "1",
         "--runs", f"dpo={out}"],
        ["annotate", "--input", candidates, "--output", str(root / "human.jsonl")],
    ]
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), \
                contextlib.redirect_stderr(printed):
            mp.setenv("OPENAI_API_KEY", KEY)
            mp.setattr("sys.stdin", io.StringIO("b a\na b\nb a\n\n"))
            for argv in commands:
                assert main(argv) == 0, (argv, printed.getvalue()[-2000:])
    finally:
        endpoint.close()
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(previous_level)
    return (root, printed.getvalue() + logged.getvalue(),
            [r["auth"] for r in endpoint.requests])


def test_api_key_is_never_written_printed_or_logged(pipeline):
    root, text, auth = pipeline
    assert auth and set(auth) == {f"Bearer {KEY}"}  # the key was in use all along
    written = [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"config.yaml", "metrics.jsonl", "trainer_state.json", "judged.jsonl",
            "judged.jsonl.progress.jsonl", "report.json", "report.html", "report.md",
            "human.jsonl"} <= names
    for secret in (KEY, KEY[3:19]):  # whole, or a recognisable part of it
        assert secret not in text
        leaks = [p for p in written if secret.encode() in p.read_bytes()]
        assert leaks == []


PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


def test_weights_are_safetensors_and_the_only_pickles_load_weights_only(pipeline):
    """Adapter, merged model and checkpoints hold their weights in .safetensors; the only
    pickles are a checkpoint's optimizer, scheduler and RNG state, and they load with
    weights_only=True (which refuses anything but tensors and plain values)."""
    out = pipeline[0] / "dpo"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "final-merged" / "model.safetensors").is_file()
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert {p.name for p in pickles} == {"optimizer.pt", "scheduler.pt", "rng.pt"}
    assert all(p.parent.parent.name == "checkpoints" for p in pickles)
    for path in pickles:
        torch.load(path, weights_only=True)
    for ckpt in (out / "checkpoints").iterdir():
        assert (ckpt / "trainable.safetensors").is_file()


def test_pickled_weights_are_not_loaded(tmp_path, tiny_model_dir):
    """A model directory whose weights are only a pickle (.bin) is refused in one line that
    says why and how to convert it; the same weights as safetensors load."""
    import shutil

    from prefalign.errors import PrefalignError
    from prefalign.models import init_reward_model, load_causal_lm

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    model = load_causal_lm(str(pickled))
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for load in (load_causal_lm, init_reward_model):
        with pytest.raises(PrefalignError, match="safetensors only") as err:
            load(str(pickled))
        assert "\n" not in str(err.value) and str(pickled) in str(err.value)
