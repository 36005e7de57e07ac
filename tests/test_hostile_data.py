"""Hostile data and config files: every one ends in exit code 2 and one line naming the file
(and line, field or key) and the fix, without a traceback and without reading more of the
file than it needs; nothing is silently dropped, overwritten or written as non-JSON.
The committed bad files are in tests/data/bad (tests/test_bad_input.py runs them); the ones
here are made at test time because they are large or built for one reader."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import preference_rows, write_jsonl
from helpers import run_cli as run
from prefalign.data import load_preferences
from prefalign.data import sources as sources_module
from prefalign.data.prompts import load_prompts
from prefalign.data.unpaired import load_unpaired
from prefalign.errors import DataError
from prefalign.preferences import annotate, judge
from prefalign.preferences.merge import merge_preferences

ROW = {"prompt": "The film 1:", "chosen": " was great fun.", "rejected": " was awful."}


def assert_one_line(code, err, start, *words):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"prefalign: error: {start}"), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- JSON that breaks a parser -----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_100k_deep_nested_row_is_one_line_not_a_recursion_error(tmp_path, capsys, suffix):
    deep = json.dumps(ROW)[:-1] + ', "margin": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = write_lines(tmp_path / f"deep{suffix}", [json.dumps(ROW), deep])
    code, _, err = run(capsys, ["data", "check", path])
    assert_one_line(code, err, f"{path}:2:", "nested too deeply")


def test_a_deep_json_array_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    code, _, err = run(capsys, ["data", "check", path])
    assert_one_line(code, err, f"{path}:", "nested too deeply")


@pytest.mark.parametrize("field", ["weight", "margin"])
def test_a_huge_integer_literal_is_one_line_not_an_overflow(tmp_path, capsys, field):
    row = json.dumps(ROW)[:-1] + f', "{field}": ' + "9" * 400 + "}"
    path = write_lines(tmp_path / "huge.jsonl", [json.dumps(ROW), row])
    code, _, err = run(capsys, ["data", "check", path])
    assert_one_line(code, err, f"{path}:2:", "integer of 400 digits is too large")
    # 5,000 digits: past Python's own limit on parsing an int (a ValueError of its own).
    write_lines(path, [json.dumps(ROW), row.replace("9" * 400, "9" * 5000)])
    code, _, err = run(capsys, ["data", "check", path])
    assert_one_line(code, err, f"{path}:2:", "integer of 5000 digits")


def test_duplicate_keys_in_a_json_array_file_and_a_nested_message(tmp_path, capsys):
    path = tmp_path / "dup.json"
    path.write_text('[{"prompt": "p", "chosen": " a", "rejected": " b", "rejected": " c"}]')
    code, _, err = run(capsys, ["data", "check", path])
    assert_one_line(code, err, f"{path}", "key 'rejected' appears twice")
    nested = ('{"prompt": [{"role": "user", "content": "hi", "role": "system"}], '
              '"chosen": " a", "rejected": " b"}')
    path = write_lines(tmp_path / "dup.jsonl", [json.dumps(ROW), nested])
    code, _, err = run(capsys, ["data", "check", path])
    assert_one_line(code, err, f"{path}:2:", "key 'role' appears twice")
    path = tmp_path / "one.json"  # a single pretty-printed object
    path.write_text('\n{\n  "prompt": "p",\n  "chosen": " a",\n  "rejected": " b",\n'
                    '  "chosen": " c"\n}\n')
    code, _, err = run(capsys, ["data", "check", path])
    assert_one_line(code, err, f"{path}:2:", "key 'chosen' appears twice")


def test_duplicate_parquet_columns_are_refused(tmp_path, capsys):
    path = tmp_path / "dup.parquet"
    table = pa.Table.from_arrays([pa.array(["p"]), pa.array([" a"]), pa.array([" b"]),
                                  pa.array([" c"])],
                                 names=["prompt", "chosen", "rejected", "chosen"])
    pq.write_table(table, path)
    code, _, err = run(capsys, ["data", "check", path])
    assert_one_line(code, err, f"{path}:", "column 'chosen' appears twice in the schema")


# ---- lone surrogates and messages without a role, in every reader ------------------------

SURROGATE_ROW = '{"prompt": "The film \\ud83d 2:", "chosen": " a", "rejected": " b"}'


def test_a_lone_surrogate_is_refused_by_every_loader(tmp_path, capsys):
    path = write_lines(tmp_path / "s.jsonl", [json.dumps(ROW), SURROGATE_ROW])
    for kind in ("preference", "kto"):
        code, _, err = run(capsys, ["data", "check", path, "--kind", kind])
        assert_one_line(code, err, f"{path}:2:", "field 'prompt'", "lone UTF-16 surrogate",
                        "\\ud83d")
    for load in (load_preferences, load_unpaired):
        with pytest.raises(DataError, match=r":2: field 'prompt' holds a lone UTF-16"):
            load(path, None)
    sft = write_lines(tmp_path / "sft.jsonl", [
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "\\udc00 yes"}]}'])
    code, _, err = run(capsys, ["data", "check", sft, "--kind", "sft"])
    assert_one_line(code, err, f"{sft}:1:", "field 'messages[1].content'", "\\udc00")
    # A well-formed pair of escapes is one character, and is kept.
    good = write_lines(tmp_path / "pair.jsonl", [SURROGATE_ROW.replace("\\ud83d", "\\ud83d\\ude00")])
    assert load_prompts(good)[0]["prompt"] == "The film \U0001f600 2:"


def test_a_lone_surrogate_in_prompts_and_candidates_is_refused(tmp_path):
    prompts = write_lines(tmp_path / "prompts.jsonl", ['{"prompt": "ok"}',
                                                       '{"prompt": "bad \\ud800"}'])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: field 'prompt' holds a lone"):
        load_prompts(prompts)
    candidates = write_lines(tmp_path / "c.jsonl", [
        '{"prompt": "q", "candidates": ["a", "b"]}',
        '{"prompt": "q", "candidates": ["a", "b \\udfff"]}'])
    for read in (judge.read_items, annotate.read_items):
        with pytest.raises(DataError, match=r"c.jsonl:2: field 'candidates\[1\]' holds a lone"):
            read(candidates)


def test_a_prompt_message_without_a_role_is_refused(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [
        '{"prompt": "ok"}', '{"prompt": [{"content": "hi"}]}'])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: field 'prompt' message 0 must be "
                                        r"an object with 'role' and 'content'"):
        load_prompts(path)
    path = write_lines(tmp_path / "messages.jsonl", [
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}'])
    with pytest.raises(DataError, match=r"messages.jsonl:1: field 'messages' message 1 has "
                                        r"role 'robot'"):
        load_prompts(path)


# ---- weights -----------------------------------------------------------------------------


def test_weights_that_sum_to_zero_over_the_kept_rows_are_refused(tmp_path, capsys):
    # The only row with a positive weight is dropped (chosen == rejected): the kept rows
    # weigh 0 in all, and a run would train on nothing.
    rows = [dict(ROW, weight=0), {"prompt": "q", "chosen": " a", "rejected": " a", "weight": 1},
            dict(ROW, prompt="The film 3:", weight=0.0)]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    code, _, err = run(capsys, ["data", "check", path, "--max-drop-fraction", "0.5"])
    assert_one_line(code, err, f"{path}: ", "every kept row has weight 0", "column 'weight'")
    with pytest.raises(DataError, match="every kept row has weight 0"):
        load_preferences(path, None, max_drop_fraction=0.5)
    with pytest.raises(DataError, match="every kept row has weight 0"):
        load_unpaired(path, None, max_drop_fraction=0.5)
    # One positive weight among zeros trains on that row: accepted.
    path = write_jsonl(tmp_path / "ok.jsonl", [dict(ROW, weight=0), dict(ROW, prompt="q",
                                                                           weight=0.5)])
    code, out, err = run(capsys, ["data", "check", path])
    assert code == 0, err


@pytest.mark.parametrize("literal, words", [
    ("-1", "must be >= 0, got -1"), ("NaN", "must be finite, got nan"),
    ("Infinity", "must be finite, got inf"), ("1e400", "must be finite, got inf"),
    ('"2"', "must be a number, got str")])
def test_negative_and_non_finite_weights_are_refused(tmp_path, capsys, literal, words):
    path = write_lines(tmp_path / "w.jsonl", [json.dumps(ROW)[:-1] + f', "weight": {literal}}}'])
    for kind in ("preference", "kto"):
        code, _, err = run(capsys, ["data", "check", path, "--kind", kind])
        assert_one_line(code, err, f"{path}:1:", "field 'weight'", words)


def test_merge_never_writes_infinity(tmp_path, capsys):
    path = write_jsonl(tmp_path / "big.jsonl", [ROW, dict(ROW, prompt="q", weight=1e308)])
    out = tmp_path / "merged.jsonl"
    with pytest.raises(DataError, match=r"big.jsonl:2: weight 1e\+308 times the input's "
                                        r"weight 10 overflows to inf"):
        merge_preferences([(path, 10)], out)
    assert not out.exists()
    code, _, err = run(capsys, ["data", "merge", f"{path}:10", "--output", out])
    assert_one_line(code, err, f"{path}:2:", "overflows", "scale the weights down")
    assert not out.exists()
    # In range, the merged file is standard JSON that reads back.
    merge_preferences([(path, 1)], out)
    weights = [json.loads(line)["weight"] for line in out.read_text().splitlines()]
    assert weights == [1.0, 1e308] and all(map(math.isfinite, weights))


# ---- big files: read as a stream ---------------------------------------------------------


def test_a_bad_line_2_of_a_50mb_file_fails_without_reading_the_file(tmp_path, monkeypatch):
    path = tmp_path / "bad_line_2.jsonl"
    line = json.dumps(ROW) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(line + line[:30] + "\n")  # line 2 is cut off
        f.write(line * (50_000_000 // len(line)))
    assert path.stat().st_size > 50_000_000
    handles = []

    class Counting:
        """The file, counting the bytes the reader takes from it."""

        def __init__(self, handle):
            self.handle, self.taken = handle, 0
            handles.append(self)

        def read(self, size=-1):
            data = self.handle.read(size)
            self.taken += len(data)
            return data

        def __iter__(self):
            for line in self.handle:
                self.taken += len(line)
                yield line

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(sources_module, "open", lambda *a, **k: Counting(open(*a, **k)),
                        raising=False)
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail("read whole file"))
    with pytest.raises(DataError, match=r"bad_line_2.jsonl:2: invalid JSON"):
        sources_module.load_rows(path)
    assert len(handles) == 1 and handles[0].handle.closed
    # One block of sources.READ_BLOCK bytes around line 2, not the 50 MB.
    assert 0 < handles[0].taken <= sources_module.READ_BLOCK < 2_000_000, handles[0].taken


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_streamed_lines_keep_line_numbers_bom_and_bad_bytes(tmp_path, monkeypatch, block):
    # Blocks smaller than a line, a multi-byte character or the byte-order mark included.
    monkeypatch.setattr(sources_module, "READ_BLOCK", block)
    path = tmp_path / "p.jsonl"
    rows = preference_rows(3) + [dict(ROW, prompt="caf\u00e9 \u4e16\u754c \U0001f600")]
    body = "\n\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode() + b"\r\n")
    loaded = sources_module.load_rows(path)
    assert [r.data for r in loaded] == rows
    assert [r.origin for r in loaded] == [f"{path}:{n}" for n in (1, 3, 5, 7)]
    path.write_bytes((json.dumps(rows[0]) + "\n") .encode() * 3 + b'{"prompt": "caf\xe9"}')
    with pytest.raises(DataError, match=r":4: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        sources_module.load_rows(path)


# ---- YAML configs ------------------------------------------------------------------------

LAUGHS = """\
beta: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
stop_sequences: *i
"""


@pytest.mark.parametrize("text, where, words", [
    (LAUGHS, ":2:", ("alias *a", "may not use anchors and aliases")),
    ("beta: 0.1\nlearning_rate: 1e-5\nbeta: 0.5\n", ":3:",
     ("key 'beta' is given twice (first on line 1)", "remove one")),
    ("lora_target_modules:\n  q: 1\n  q: 2\n", ":3:", ("key 'q' is given twice",)),
])
def test_config_aliases_and_duplicate_keys_are_refused(tmp_path, capsys, text, where, words):
    config = tmp_path / "c.yaml"
    config.write_text(text, encoding="utf-8")
    code, _, err = run(capsys, ["dpo", "--config", config, "--model", tmp_path / "none",
                                "--data", tmp_path / "none.jsonl", "--output-dir", tmp_path])
    assert_one_line(code, err, f"{config}{where}", *words)


# ---- other writers of numbers: score -----------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    from prefalign.models import RewardModel
    from prefalign.tiny import build_model

    path = tmp_path_factory.mktemp("rm") / "rm"
    RewardModel.from_causal_lm(build_model(tokenizer, seed=2),
                               tokenizer.pad_token_id).save_pretrained(path, tokenizer)
    return str(path)


def test_score_never_writes_nan(tmp_path, reward_model_dir, monkeypatch):
    import prefalign.scoring.score_file as reward

    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(3))
    out = tmp_path / "scored.jsonl"
    monkeypatch.setattr(reward.RewardScorer, "score_ids",
                        lambda self, sequences: [math.nan] * len(sequences))
    with pytest.raises(DataError, match=r"p.jsonl:1: a score or value is NaN or infinite"):
        reward.score_file(reward_model_dir, data, out)
    assert not out.exists()
