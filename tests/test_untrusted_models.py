"""Model files, checkpoints and specs that are damaged, hostile or not local: each ends in
one line and exit code 2 (or a refusal inside the library), never a traceback, a
recursion, a huge allocation, a network request or code the user did not ask to run."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from helpers import preference_rows, write_jsonl
from prefalign.cli import main
from prefalign.errors import ConfigError, PrefalignError
from prefalign.lora import ADAPTER_CONFIG, apply_lora, save_adapter
from prefalign.models import load_causal_lm
from prefalign.scoring import load_scorer

SRC = Path(__file__).resolve().parents[1] / "src" / "prefalign"


def error_line(capsys) -> str:
    """The one error line the CLI printed (exit code 2 is checked by the caller)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err[err.index("prefalign: error: "):]
    assert line.count("\n") == 1, line
    return line


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def adapter_dir(tmp_path, tiny_model_dir, make_model, tokenizer):
    """A LoRA adapter (PEFT format, with its tokenizer) on the tiny model directory."""
    model = make_model("llama")
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    path = tmp_path / "adapter"
    save_adapter(model, path, base_model_name_or_path=str(tiny_model_dir))
    tokenizer.save_pretrained(path)
    return path


def set_base(adapter: Path, base: str) -> None:
    file = adapter / ADAPTER_CONFIG
    config = json.loads(file.read_text())
    config["base_model_name_or_path"] = base
    file.write_text(json.dumps(config))


# ---- adapters and weight files ---------------------------------------------------------------


def test_an_adapter_whose_base_is_itself_is_one_line(adapter_dir):
    set_base(adapter_dir, str(adapter_dir))
    with pytest.raises(PrefalignError) as exc:
        load_causal_lm(str(adapter_dir))
    message = one_line(exc)
    assert f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path" in message
    assert "leads back to an adapter being loaded" in message


def test_a_cycle_of_adapters_is_one_line_naming_the_loop(adapter_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(adapter_dir, other)
    set_base(adapter_dir, str(other))
    set_base(other, str(adapter_dir))
    with pytest.raises(PrefalignError) as exc:
        load_causal_lm(str(adapter_dir))
    assert f"({adapter_dir} -> {other} -> {adapter_dir})" in one_line(exc)


def test_a_self_referencing_adapter_as_a_reward_model_is_one_line(adapter_dir):
    from prefalign.models import init_reward_model, load_reward_model

    set_base(adapter_dir, str(adapter_dir))
    for load in (load_reward_model, init_reward_model):
        with pytest.raises(PrefalignError) as exc:
            load(str(adapter_dir))
        assert str(adapter_dir) in one_line(exc)


def test_a_cut_adapter_config_names_the_file(adapter_dir, capsys, tmp_path):
    file = adapter_dir / ADAPTER_CONFIG
    file.write_text(file.read_text()[:40])
    with pytest.raises(PrefalignError) as exc:
        load_causal_lm(str(adapter_dir))
    assert f"cannot read {file}: it is cut short or not JSON" in one_line(exc)
    # The same file through a command: exit 2 and one line.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a b"}])
    argv = ["generate", "--model", str(adapter_dir), "--data", prompts, "--scorer",
            "length(max=5)", "--output", str(tmp_path / "pairs.jsonl")]
    assert main(argv) == 2
    assert f"cannot read {file}" in error_line(capsys)


def cut_in_half(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def test_truncated_model_safetensors_is_one_line(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    cut_in_half(model_dir / "model.safetensors")
    with pytest.raises(PrefalignError) as exc:
        load_causal_lm(str(model_dir))
    message = one_line(exc)
    assert f"{model_dir}: model.safetensors is cut short (" in message
    assert "copy the model directory again" in message


def test_truncated_adapter_weights_are_one_line(adapter_dir):
    cut_in_half(adapter_dir / "adapter_model.safetensors")
    with pytest.raises(PrefalignError) as exc:
        load_causal_lm(str(adapter_dir))
    assert "adapter_model.safetensors is cut short" in one_line(exc)


def test_a_config_asking_for_enormous_dimensions_is_refused_before_allocating(tmp_path,
                                                                             tiny_model_dir):
    """A config.json edited to 64 layers of width 65536 describes about 3.5e12 parameters
    (13 TiB in fp32): refused from the config alone, naming the numbers."""
    model_dir = tmp_path / "huge"
    shutil.copytree(tiny_model_dir, model_dir)
    config = LlamaConfig.from_pretrained(model_dir)
    config.hidden_size, config.intermediate_size = 65536, 262144
    config.num_hidden_layers, config.num_attention_heads = 64, 64
    config.num_key_value_heads = 64
    config.save_pretrained(model_dir)
    started = time.monotonic()
    with pytest.raises(PrefalignError) as exc:
        load_causal_lm(str(model_dir))
    message = one_line(exc)
    assert time.monotonic() - started < 60
    assert f"{model_dir}: its config.json describes " in message
    params = int(message.split("describes ")[1].split(" parameters")[0].replace(",", ""))
    assert 3e12 < params < 4e12
    assert "GiB of weights, but only" in message and "GiB of available memory" in message


def test_a_model_that_fits_passes_the_memory_check(tiny_model_dir):
    assert load_causal_lm(str(tiny_model_dir)).num_parameters() > 0


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", preference_rows(8))


def dpo_args(model, data, out, *extra):
    return ["dpo", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4",
            "--lora-dropout", "0.0", "--warmup-ratio", "0", "--logging-steps", "1",
            "--save-steps", "1", "--seed", "5", *map(str, extra)]


@pytest.fixture(scope="module")
def run_r4(tmp_path_factory, tiny_model_dir, prefs):
    """A finished LoRA rank-4 DPO run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("r4") / "run"
    assert main(dpo_args(tiny_model_dir, prefs, out)) == 0
    return out


def test_resume_from_a_checkpoint_of_another_rank_names_both_ranks(run_r4, tiny_model_dir,
                                                                   prefs, tmp_path, capsys):
    checkpoint = run_r4 / "checkpoints" / "step-0000001"
    out = tmp_path / "r8"
    argv = dpo_args(tiny_model_dir, prefs, out, "--lora-r", "8", "--resume-from", checkpoint)
    capsys.readouterr()
    assert main(argv) == 2
    line = error_line(capsys)
    assert f"checkpoint {checkpoint} holds LoRA rank 4" in line
    assert "this run's model has rank 8 (lora_r)" in line


def test_resume_after_config_yaml_was_edited_to_another_rank(run_r4, tiny_model_dir, prefs,
                                                             tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_r4, out)
    shutil.rmtree(out / "checkpoints" / "step-0000002")
    saved = out / "config.yaml"
    saved.write_text(saved.read_text().replace("lora_r: 4", "lora_r: 16"))
    capsys.readouterr()
    assert main(dpo_args(tiny_model_dir, prefs, out, "--lora-r", "16", "--resume")) == 2
    assert "holds LoRA rank 4" in error_line(capsys)


class _Sentinel:
    """Unpickling this writes a file: the proof that the pickle was never run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_an_optimizer_pt_pickling_arbitrary_objects_is_refused_unread(run_r4, tiny_model_dir,
                                                                      prefs, tmp_path, capsys):
    checkpoint = tmp_path / "step-0000001"
    shutil.copytree(run_r4 / "checkpoints" / "step-0000001", checkpoint)
    ran = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "x": _Sentinel(str(ran))},
               checkpoint / "optimizer.pt")
    capsys.readouterr()
    assert main(dpo_args(tiny_model_dir, prefs, tmp_path / "out", "--resume-from",
                         checkpoint)) == 2
    line = error_line(capsys)
    assert f"checkpoint file {checkpoint / 'optimizer.pt'} holds objects other than" in line
    assert "refused without unpickling them" in line
    assert not ran.exists()


def test_a_models_own_chat_template_that_raises_is_one_line(tmp_path, tiny_model_dir,
                                                             tokenizer, capsys):
    """The template saved with the model (not --chat-template, which is checked on load)
    fails on a generation prompt: one line naming the prompt, in `generate` as in training
    (data check's row case: tests/test_chat_template.py)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    own = tokenizer.__class__.from_pretrained(model_dir)
    own.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{{ raise_exception('no generation prompt here') "
                         "if add_generation_prompt else '' }}")
    own.save_pretrained(model_dir)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": [{"role": "user", "content": "hi"}]}])
    argv = ["generate", "--model", str(model_dir), "--data", prompts, "--scorer",
            "length(max=5)", "--output", str(tmp_path / "pairs.jsonl")]
    assert main(argv) == 2
    assert "prompt 0: the chat template failed on this row: no generation prompt here" \
        in error_line(capsys)


# ---- scorer specs: no remote code -------------------------------------------------------------


def test_a_scorer_spec_cannot_turn_on_remote_code(tiny_model_dir):
    with pytest.raises(ConfigError) as exc:
        load_scorer(f"{tiny_model_dir}(trust_remote_code=true)")
    message = one_line(exc)
    assert "trust_remote_code cannot be set in a scorer spec" in message
    assert "--trust-remote-code flag" in message


def test_generate_refuses_remote_code_through_its_scorer(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a b"}])
    argv = ["generate", "--model", str(tiny_model_dir), "--data", prompts, "--scorer",
            f"{tiny_model_dir}(trust_remote_code=true)", "--output", str(tmp_path / "o.jsonl")]
    assert main(argv) == 2
    assert "trust_remote_code cannot be set in a scorer spec" in error_line(capsys)


def test_no_model_file_can_turn_on_remote_code(tmp_path, tiny_model_dir, adapter_dir, capsys):
    """A config.json whose auto_map names the directory's own Python, reached directly and
    through an adapter whose adapter_config.json says trust_remote_code: true: refused in
    one line, and the file never runs (only a command's --trust-remote-code runs it)."""
    model_dir = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, model_dir)
    ran = tmp_path / "code-ran"
    (model_dir / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n"
        "from transformers import LlamaConfig as EvilConfig\n"
        "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    config = json.loads((model_dir / "config.json").read_text())
    # An architecture transformers does not know: its code is the only way to build it.
    config["model_type"] = "evil-llama"
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    set_base(adapter_dir, str(model_dir))
    file = adapter_dir / ADAPTER_CONFIG
    file.write_text(json.dumps({**json.loads(file.read_text()), "trust_remote_code": True}))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a b"}])
    for model in (model_dir, adapter_dir):
        argv = ["generate", "--model", str(model), "--data", prompts, "--scorer",
                "length(max=5)", "--output", str(tmp_path / f"pairs-{model.name}.jsonl")]
        assert main(argv) == 2
        line = error_line(capsys)
        assert str(model_dir) in line and "--trust-remote-code flag" in line, line
    assert not ran.exists()


# ---- offline first ---------------------------------------------------------------------------


SITECUSTOMIZE = """
import os, socket

def _refuse(*args, **kwargs):
    with open(os.environ["CONNECT_LOG"], "a") as log:
        log.write(repr(args[1:2]) + "\\n")
    raise OSError("network disabled by the test")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.getaddrinfo = _refuse
"""


def run_offline(tmp_path, *argv, env_extra=None):
    """`prefalign ARGV` in a subprocess whose sockets record and refuse every connection;
    HF_HUB_OFFLINE is unset, as on a user's machine. -> (returncode, stderr, connections)."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    log = tmp_path / "connections.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",
                                                             "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]), CONNECT_LOG=str(log),
               HF_HOME=str(tmp_path / "hf-home"), **(env_extra or {}))
    done = subprocess.run([sys.executable, "-m", "prefalign", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return done.returncode, done.stderr, log.read_text() if log.exists() else ""


def test_an_uncached_hub_id_fails_at_once_without_a_request(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a b"}])
    started = time.monotonic()
    code, err, connections = run_offline(
        tmp_path, "generate", "--model", "someorg/not-cached", "--data", prompts, "--scorer",
        "length(max=5)", "--output", tmp_path / "pairs.jsonl")
    elapsed = time.monotonic() - started
    assert connections == ""
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "someorg/not-cached: no such directory, and no model of that name in the local " \
           "hub cache" in err
    assert "pass --allow-download (or set HF_HUB_OFFLINE=0)" in err
    assert elapsed < 45  # was about 50 s of retries; the imports alone take a few seconds


def test_an_adapter_on_a_hub_id_makes_no_request(tmp_path, adapter_dir):
    set_base(adapter_dir, "someorg/base-not-cached")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a b"}])
    code, err, connections = run_offline(
        tmp_path, "generate", "--model", adapter_dir, "--data", prompts, "--scorer",
        "length(max=5)", "--output", tmp_path / "pairs.jsonl")
    assert connections == ""
    assert code == 2, err
    assert "cannot load a causal LM from someorg/base-not-cached: no such directory" in err


def test_allow_download_switches_the_hub_client_back_on(monkeypatch):
    import huggingface_hub.constants as constants

    from prefalign import hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_allowed", False)
    hub.offline_by_default()
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not hub.downloads_allowed()
    hub.allow_downloads()
    assert constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"
    assert hub.downloads_allowed()
    monkeypatch.setattr(hub, "_allowed", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # set explicitly by the user: allowed
    assert hub.downloads_allowed()


def test_every_command_that_loads_models_has_allow_download():
    from prefalign.cli import TOOLS, TRAINERS, build_parser

    for command in (*TRAINERS, "score", "evaluate", "generate", "judge"):
        parser = build_parser(command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        flags = {s for a in sub._actions for s in a.option_strings}
        assert "--allow-download" in flags, command
    assert set(TOOLS) >= {"score", "evaluate", "generate", "judge"}


def test_every_from_pretrained_call_passes_local_files_only():
    """Loads from a directory or the cache pass local_files_only (True unless downloads are
    allowed): transformers would otherwise ask the hub for files a directory lacks."""
    calls = []
    for file in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            name = getattr(node.func, "attr", getattr(node.func, "id", None)) \
                if isinstance(node, ast.Call) else None
            if name in ("from_pretrained", "snapshot_download"):
                keywords = {k.arg for k in node.keywords}
                calls.append((f"{file.relative_to(SRC)}:{node.lineno}",
                              "local_files_only" in keywords))
    assert len(calls) >= 4
    assert [where for where, ok in calls if not ok] == []
