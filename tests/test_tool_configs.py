"""The tools take `--config YAML` like the trainers: a YAML file gives the same run as the
same flags, a flag overrides the file, and an unknown key is one line naming the closest
valid one (exit 2)."""

import json

import pytest
import yaml

from helpers import ScriptedServer, write_jsonl
from helpers import run_cli as run


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


def report_without_time(out_dir):
    report = json.loads((out_dir / "report.json").read_text("utf-8"))
    report.pop("created")
    report["settings"].pop("models")  # the same models, named the same, in both runs
    return report


def test_evaluate_from_yaml_equals_flags_and_flags_override(tmp_path, tiny_model_dir, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The film"}, {"prompt": "Hi"}])
    values = {"models": [f"base={tiny_model_dir}"], "prompts": prompts,
              "scorer": "length(max=10)", "max_new_tokens": 4, "seed": 3, "num_samples": 2,
              "finding": ["one, with a comma", "two"], "bootstrap": 20}
    flags = ["--models", f"base={tiny_model_dir}", "--prompts", prompts, "--scorer",
             "length(max=10)", "--max-new-tokens", "4", "--seed", "3", "--num-samples", "2",
             "--finding", "one, with a comma", "--finding", "two", "--bootstrap", "20"]
    config = write_yaml(tmp_path / "eval.yaml", {**values, "output_dir": str(tmp_path / "a")})
    assert run(capsys, ["evaluate", "--config", config])[0] == 0
    assert run(capsys, ["evaluate", *flags, "--output-dir", str(tmp_path / "b")])[0] == 0
    from_yaml, from_flags = (report_without_time(tmp_path / d) for d in "ab")
    assert from_yaml == from_flags
    assert from_yaml["findings"] == ["one, with a comma", "two"]
    assert from_yaml["settings"]["sampling"]["n"] == 2
    code, _, err = run(capsys, ["evaluate", "--config", config, "--max-new-tokens", "3",
                                "--output-dir", str(tmp_path / "c")])
    assert code == 0, err
    settings = report_without_time(tmp_path / "c")["settings"]["sampling"]
    assert settings["max_new_tokens"] == 3 and settings["seed"] == 3


def test_generate_from_yaml_equals_flags(tmp_path, tiny_model_dir, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Prompt {i}"} for i in range(3)])
    values = {"model": str(tiny_model_dir), "data": prompts, "scorer": "length(max=5,falloff=50)",
              "num_candidates": 3, "max_new_tokens": 5, "temperature": 0.9, "top_k": 20,
              "seed": 2, "pairing": "all"}
    flags = ["--model", str(tiny_model_dir), "--data", prompts, "--scorer", "length(max=5,falloff=50)",
             "--num-candidates", "3", "--max-new-tokens", "5", "--temperature", "0.9",
             "--top-k", "20", "--seed", "2", "--pairing", "all"]
    config = write_yaml(tmp_path / "gen.yaml", {**values, "output": str(tmp_path / "a.jsonl")})
    assert run(capsys, ["generate", "--config", config])[0] == 0
    assert run(capsys, ["generate", *flags, "--output", str(tmp_path / "b.jsonl")])[0] == 0
    rows = (tmp_path / "a.jsonl").read_text().splitlines()
    assert rows and rows == (tmp_path / "b.jsonl").read_text().splitlines()
    assert {json.loads(r)["top_k"] for r in rows} == {20}
    # A flag overrides the file: another seed samples other candidates.
    code, _, err = run(capsys, ["generate", "--config", config, "--seed", "5",
                                "--output", str(tmp_path / "c.jsonl")])
    assert code == 0, err
    assert {json.loads(r)["seed"] for r in (tmp_path / "c.jsonl").read_text().splitlines()} \
        <= {5}


def test_judge_from_yaml_equals_flags(tmp_path, monkeypatch, capsys):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    data = write_jsonl(tmp_path / "items.jsonl", [
        {"prompt": f"P{i}", "candidates": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(3)])
    server = ScriptedServer({}, default=(200, "2,0,1"))
    try:
        values = {"input": data, "judge_url": server.url, "judge_model": "m",
                  "network_retries": 0, "seed": 4}
        config = write_yaml(tmp_path / "judge.yaml", {**values, "output": str(tmp_path / "a.jsonl")})
        assert run(capsys, ["judge", "--config", config])[0] == 0
        flags = ["--input", data, "--judge-url", server.url, "--judge-model", "m",
                 "--network-retries", "0", "--seed", "4", "--output", str(tmp_path / "b.jsonl")]
        assert run(capsys, ["judge", *flags])[0] == 0
        code, _, err = run(capsys, ["judge", "--config", config, "--max-new-tokens", "9",
                                    "--output", str(tmp_path / "c.jsonl")])
        assert code == 0, err
    finally:
        server.close()
    rows = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(rows) == 9 and rows == (tmp_path / "b.jsonl").read_text().splitlines()
    assert [r["body"]["max_tokens"] for r in server.requests[-3:]] == [9, 9, 9]
    assert {r["body"]["max_tokens"] for r in server.requests[:6]} == {64}


@pytest.mark.parametrize("words, key, meant", [
    (["evaluate"], "max_new_token", "max_new_tokens"),
    (["generate"], "num_candidate", "num_candidates"),
    (["judge"], "judge_modle", "judge_model"),
    (["judge", "agreement"], "target_kapa", "target_kappa"),
    (["score"], "reward_modle", "reward_model"),
    (["data", "check", "rows.jsonl"], "max_lenght", "max_length"),
    (["data", "merge", "a.jsonl"], "val_fractoin", "val_fraction"),
    (["demo"], "quik", "quick"),
])
def test_an_unknown_key_is_one_line_naming_the_closest(tmp_path, capsys, words, key, meant):
    config = write_yaml(tmp_path / "bad.yaml", {key: 1})
    code, out, err = run(capsys, [*words, "--config", config])
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"unknown key '{key}' (did you mean '{meant}'?)" in err and str(config) in err
    assert not (tmp_path / "demo-output").exists()


def test_a_required_option_missing_from_yaml_and_flags_is_named(tmp_path, capsys):
    config = write_yaml(tmp_path / "gen.yaml", {"data": "p.jsonl", "scorer": "length",
                                                "output": "o.jsonl"})
    code, _, err = run(capsys, ["generate", "--config", config])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "config key 'model' is required (--model ...)" in err
    code, _, err = run(capsys, ["generate", "--config", config, "--temperature", "-1",
                                "--model", "m"])
    assert code == 2 and "config key 'temperature' must be >= 0" in err, err


def test_tool_help_offers_config_and_the_sampling_options(capsys):
    code, out, _ = run(capsys, ["evaluate", "--help"])
    assert code == 0
    assert "--config YAML" in out and "--top-k TOP_K" in out and "--stop-strings" in out
    code, out, _ = run(capsys, ["judge", "--help"])
    assert code == 0 and "--max-new-tokens" in out and "--top-p" not in out
