"""Bad preference files (tests/data/bad, see its README): every command either processes a
file with an exact count of what it dropped or truncated, or stops before training with
exit code 2 and one line on stderr naming file, line or row, and field, without a
traceback (`--debug` shows one)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import preference_rows
from prefalign.cli import main

BAD = Path(__file__).parent / "data" / "bad"
COMMANDS = ("check", "dpo", "reward", "kto")
TRAINERS = ("dpo", "reward", "kto")

# file -> (where, words in the message); a dict of them when kto (unpaired-capable) differs.
ERRORS = {
    "truncated_line.jsonl": (":3:", ("invalid JSON", "Unterminated string", "column 37")),
    "wrong_type.jsonl": (":2:", ("field 'chosen'", "must be a string or a list of messages",
                                 "got int")),
    "missing_field.jsonl": (":3:", ("missing field 'rejected'", "'prompt', 'chosen'")),
    "non_utf8.jsonl": (":3:", ("not valid UTF-8", "0xe9", "column 16", "re-save")),
    "conv_wrong_role.jsonl": (":2:", ("field 'chosen' message 0", "role 'human'",
                                      "system, user, assistant, tool")),
    "conv_no_assistant.jsonl": (":2:", ("field 'chosen'", "must end with an assistant turn",
                                        "role 'user'")),
    "mixed_paired_unpaired.jsonl": {
        "default": (":2:", ("missing field 'chosen'", "'completion', 'label'")),
        "kto": (":2:", ("field 'completion'", "marks a row as unpaired",
                        "one kind of row per file")),
    },
    "wrong_schema.parquet": {
        "default": (" row 0:", ("missing field 'chosen'", "'question', 'answer_a', 'answer_b'")),
        "kto": (" row 0:", ("missing field 'completion'", "'question'")),
    },
    "empty.jsonl": (":", ("no rows",)),
    "duplicate_key.jsonl": (":2:", ("key 'chosen' appears twice", "remove or rename one")),
    "duplicate_header.csv": (":1:", ("column 'chosen' appears twice in the header",)),
    "lone_surrogate.jsonl": (":2:", ("field 'chosen'", "lone UTF-16 surrogate (\\ud83d)",
                                     "cannot be tokenized")),
    "huge_integer.jsonl": (":2:", ("integer of 401 digits is too large",)),
    "zero_weights.jsonl": (": ", ("every kept row has weight 0", "column 'weight'")),
}
# file -> (rows, kept, {reason: count}, truncated prompts (pairs), truncated prompts (kto))
PROCESSED = {
    "empty_strings.jsonl": (4, 2, {"empty completion": 2}, 0, 0),
    "chosen_equals_rejected.jsonl": (4, 2, {"chosen equals rejected": 2}, 0, 0),
    "mixed_formats.jsonl": (5, 4, {"chosen equals rejected": 1}, 0, 0),
    "long_prompt.jsonl": (3, 3, {}, 1, 2),
}
LIMITS = ["--max-length", "64", "--max-prompt-length", "32"]


def test_every_bad_file_has_a_case_and_a_readme_entry():
    readme = (BAD / "README.md").read_text(encoding="utf-8")
    files = {p.name for p in BAD.iterdir() if p.name != "README.md"}
    assert files == set(ERRORS) | set(PROCESSED)
    assert all(f"`{name}`" in readme for name in files | {"huge_row.jsonl",
                                                          "one_line_array.jsonl"})


def run(capsys, command, path, model_dir, out_dir, *extra):
    """prefalign COMMAND on `path` in this process -> (exit code, stdout, stderr).

    `data check` measures in tokens with the model's tokenizer unless model_dir is None.
    """
    if command == "check":
        model = ["--model", str(model_dir)] if model_dir else []
        argv = ["data", "check", str(path), *model, *LIMITS, *extra]
    else:
        argv = [command, "--model", str(model_dir), "--data", str(path), "--output-dir",
                str(out_dir), "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1",
                "--lora-r", "2", *LIMITS, *extra]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's way out; main returns for everything else
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, path, where, words):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"prefalign: error: {path}{where}"), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def expected_error(name, command):
    case = ERRORS[name]
    return case.get(command, case["default"]) if isinstance(case, dict) else case


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", sorted(ERRORS))
def test_malformed_file_stops_with_one_line_naming_file_line_and_field(
        name, command, tiny_model_dir, tmp_path, capsys):
    path = BAD / name
    code, out, err = run(capsys, command, path, tiny_model_dir, tmp_path / "out")
    assert_one_line_error(code, err, path, *expected_error(name, command))
    # Stopped before training: the data is read before the model is even loaded.
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert "trainable params" not in out


def assert_trained(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1]
    assert (out_dir / "final").is_dir()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", sorted(PROCESSED))
def test_droppable_rows_are_counted_by_reason_and_training_goes_on(
        name, command, tiny_model_dir, tmp_path, capsys):
    path = BAD / name
    rows, kept, dropped, cut_pairs, cut_kto = PROCESSED[name]
    n_dropped = sum(dropped.values())
    # These files drop up to half their rows on purpose; the default limit (0.05) would stop.
    code, out, err = run(capsys, command, path, tiny_model_dir, tmp_path / "out",
                         "--max-drop-fraction", "0.5")
    assert code == 0, err
    if command == "check":
        lines = out.splitlines()
        assert lines[0] == f"{path}: OK"
        assert lines[1] == f"rows read: {rows}, kept: {kept}, dropped: {n_dropped}"
        for reason, count in dropped.items():
            assert any(line.startswith(f"dropped ({reason}): {count} (first: {path}:")
                       for line in lines), out
        assert f"prompt {cut_pairs}, chosen 0, rejected 0 of {kept} rows" in out
        return
    data_line = next(line for line in out.splitlines() if line.startswith("data: "))
    assert f"{path}: {rows} " in data_line and f" {kept} kept (" in data_line
    if dropped:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in dropped.items())
        assert f"{n_dropped} dropped ({reasons})" in data_line
    else:
        assert "dropped" not in data_line
    cut = cut_kto if command == "kto" else cut_pairs
    assert (f"truncated: {cut} prompts" in data_line) == bool(cut), data_line
    assert_trained(tmp_path / "out")


@pytest.mark.parametrize("command", ["check", "dpo"])
def test_strict_turns_the_first_droppable_row_into_an_error(command, tiny_model_dir, tmp_path,
                                                            capsys):
    path = BAD / "empty_strings.jsonl"
    code, _, err = run(capsys, command, path, tiny_model_dir, tmp_path / "out", "--strict")
    assert_one_line_error(code, err, path, ":2:", ("empty completion", "chosen is empty",
                                                   "strict"))


@pytest.fixture(scope="module")
def huge_files(tmp_path_factory):
    """The two 10 MB single-line files of the README, made here rather than committed."""
    folder = tmp_path_factory.mktemp("huge")
    rows = preference_rows(4)
    huge = {"prompt": "Review:", "chosen": " good" * 2_000_000, "rejected": " bad."}
    row_file = folder / "huge_row.jsonl"
    row_file.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], huge, *rows[1:]]))
    array_file = folder / "one_line_array.jsonl"
    array_file.write_text(json.dumps(rows * 50_000) + "\n")
    for path in (row_file, array_file):
        assert path.stat().st_size >= 10_000_000 and path.read_text().count("\n") <= 5
    return row_file, array_file


@pytest.mark.parametrize("command", COMMANDS)
def test_a_10mb_row_is_truncated_and_counted_quickly(command, huge_files, tiny_model_dir,
                                                     tmp_path, capsys):
    path = huge_files[0]
    # data check measures exact lengths, so it is run in characters here: tokenizing the
    # whole 10 MB with the tiny tokenizer takes half a minute (trainers cut first).
    model = None if command == "check" else tiny_model_dir
    code, out, err = run(capsys, command, path, model, tmp_path / "out")
    assert code == 0, err
    if command == "check":
        assert "rows read: 5, kept: 5, dropped: 0" in out
        assert "10000000" in next(line for line in out.splitlines() if "chosen" in line)
        return
    data_line = next(line for line in out.splitlines() if line.startswith("data: "))
    assert "5 kept" in data_line and "dropped" not in data_line
    completions = "1 completions" if command == "kto" else "1 chosen, 0 rejected"
    assert f"truncated: 0 prompts, {completions}" in data_line
    assert_trained(tmp_path / "out")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_10mb_json_array_on_one_line_is_refused(command, huge_files, tiny_model_dir,
                                                  tmp_path, capsys):
    path = huge_files[1]
    code, _, err = run(capsys, command, path, tiny_model_dir, tmp_path / "out")
    assert_one_line_error(code, err, path, ":1:", ("expected a JSON object, got array",
                                                   ".json"))
    assert len(err) < 300  # the message never echoes the line


def test_the_installed_command_shows_a_traceback_only_with_debug():
    script = Path(sys.executable).with_name("prefalign")
    if not script.is_file():
        pytest.skip("the prefalign console script is not installed next to this Python")
    path = str(BAD / "wrong_type.jsonl")
    plain = subprocess.run([str(script), "data", "check", path], capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.splitlines() == [
        f"prefalign: error: {path}:2: field 'chosen' must be a string or a list of messages, "
        "got int"]
    debug = subprocess.run([str(script), "--debug", "data", "check", path], capture_output=True,
                           text=True, timeout=120)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "prefalign.errors.DataError" in debug.stderr
