"""Tokenization: EOS/BOS rules, chat templates, truncation, and equality with TRL's ids."""

import copy
from types import SimpleNamespace

import pytest
from tokenizers.processors import TemplateProcessing

from prefalign.data import tokenize as tokenize_module
from prefalign.data.formats import normalize_rows
from prefalign.data.sources import load_rows
from prefalign.data.tokenize import (
    render_ids,
    tokenize_preferences,
    tokenizer_adds_bos,
    truncate_all,
    truncate_ids,
)
from prefalign.errors import ConfigError, DataError

EXPLICIT_ROWS = [
    {
        "prompt": "Human: What is the capital of France?\n\nAssistant:",
        "chosen": " Paris.",
        "rejected": " Lyon.",
    },
    # Already terminated: EOS must not be added a second time.
    {
        "prompt": "Write about the sea.",
        "chosen": " The sea is wide.</s>",
        "rejected": " I found it dull.</s>",
    },
    # "Fra" + "nce" merge into one token " France": the completion starts at that token.
    {"prompt": "The capital of Fra", "chosen": "nce is Paris.", "rejected": "nce is Lyon."},
    {"prompt": "", "chosen": "Good great excellent", "rejected": "Bad terrible awful"},
]
CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Write about the sea."},
        ],
        "chosen": [{"role": "assistant", "content": "The sea is wide and blue."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
]


def examples_of(rows):
    examples, report = normalize_rows(load_rows(rows))
    assert report.n_dropped == 0
    return examples


def tokenize(rows, tokenizer, **kwargs):
    return tokenize_preferences(examples_of(rows), tokenizer, **kwargs)


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The tiny tokenizer with a post-processor that puts BOS in front, as Llama's does."""
    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tokenizer_adds_bos(tok) and not tokenizer_adds_bos(tokenizer)
    return tok


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def triples(features):
    return [
        (f["prompt_input_ids"], f["chosen_input_ids"], f["rejected_input_ids"]) for f in features
    ]


def trl_triples(rows, tokenizer):
    """TRL's own DPO data preparation (extract prompt, add EOS, tokenize) on the same rows.

    `DPOTrainer._prepare_dataset` only reads `_tokenizer` from the trainer and three
    arguments, so it runs without building a trainer, a model or a download.
    """
    datasets = pytest.importorskip("datasets")
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    trainer = SimpleNamespace(_tokenizer=tokenizer)
    dataset = datasets.Dataset.from_list(rows)
    out = dpo.DPOTrainer._prepare_dataset(trainer, dataset, tokenizer, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]


@pytest.mark.parametrize("adds_bos", [False, True], ids=["no-bos", "bos"])
def test_explicit_rows_equal_trl_token_ids(tokenizer, bos_tokenizer, adds_bos):
    tok = bos_tokenizer if adds_bos else tokenizer
    features, report = tokenize(EXPLICIT_ROWS, tok, max_length=None, max_prompt_length=None)
    assert triples(features) == trl_triples(EXPLICIT_ROWS, tok)
    assert report.boundary_merged == 1  # the "Fra|nce" row


def test_conversational_rows_equal_trl_token_ids(tokenizer):
    features, _ = tokenize(CHAT_ROWS, tokenizer, max_length=None, max_prompt_length=None)
    assert triples(features) == trl_triples(CHAT_ROWS, tokenizer)


def test_eos_appended_once(tokenizer):
    eos = tokenizer.eos_token_id
    plain = {"prompt": "Say it.", "chosen": " Good.", "rejected": " Bad."}
    ended = {"prompt": "Say it.", "chosen": " Good.</s>", "rejected": " Bad.</s>"}
    (f_plain, f_ended), _ = tokenize([plain, ended], tokenizer)
    for f in (f_plain, f_ended):
        for key in ("chosen_input_ids", "rejected_input_ids"):
            assert f[key][-1] == eos and f[key].count(eos) == 1
        assert eos not in f["prompt_input_ids"]
    assert f_plain == f_ended
    assert f_plain["chosen_input_ids"] == ids(tokenizer, " Good.") + [eos]


def test_bos_only_in_front_of_the_prompt(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    (f,), _ = tokenize(
        [{"prompt": "Say it.", "chosen": " Good.", "rejected": " Bad."}], bos_tokenizer
    )
    assert f["prompt_input_ids"] == [bos] + ids(bos_tokenizer, "Say it.")
    assert bos not in f["chosen_input_ids"] and bos not in f["rejected_input_ids"]


def test_conversational_completion_ends_with_template_eos_once(tokenizer):
    eos, newline = tokenizer.eos_token_id, ids(tokenizer, "\n")
    features, _ = tokenize(CHAT_ROWS, tokenizer)
    for f, row in zip(features, CHAT_ROWS):
        # The template ends every turn with "</s>\n": that EOS is the only one.
        for key in ("chosen_input_ids", "rejected_input_ids"):
            assert f[key][-2:] == [eos] + newline and f[key].count(eos) == 1
        assert f["prompt_input_ids"][-2:] == ids(tokenizer, "<|assistant|>\n")
        full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
        assert tokenizer.decode(f["prompt_input_ids"] + f["chosen_input_ids"]) == full
    assert tokenizer.decode(features[0]["chosen_input_ids"]) == "Paris.</s>\n"


def test_template_that_does_not_render_the_prompt_as_prefix(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # The generation prompt opens a thinking block that the full conversation does not have.
    tok.chat_template = tok.chat_template.replace("'<|assistant|>\n'", "'<|assistant|>\n<think>'")
    assert tok.apply_chat_template(
        CHAT_ROWS[0]["prompt"], tokenize=False, add_generation_prompt=True
    ).endswith("<think>")
    with pytest.raises(DataError, match=r"^<list> row 0: the chat template renders the prompt"):
        tokenize(CHAT_ROWS[:1], tok)


def test_conversational_row_needs_a_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(
        DataError,
        match=r"^<list> row 1: the row is conversational but the tokenizer has no chat template",
    ):
        tokenize(EXPLICIT_ROWS[:1] + CHAT_ROWS[:1], tok)


def test_failing_template_is_a_data_error_naming_the_row(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(
        DataError,
        match=r"^<list> row 0: the chat template failed on this row: .*roles must alternate",
    ):
        tokenize(CHAT_ROWS[:1], tok)


def test_text_rows_need_an_eos_token(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = None
    with pytest.raises(DataError, match=r"^<list> row 0: the tokenizer has no eos_token"):
        tokenize(EXPLICIT_ROWS[:1], tok)


PROMPT, CHOSEN, REJECTED = list(range(1, 11)), list(range(11, 21)), list(range(21, 26))


@pytest.mark.parametrize(
    "max_length, max_prompt_length, expected",
    [
        # Nothing to cut: 10 + 10 <= 20.
        (20, 10, (PROMPT, CHOSEN, REJECTED)),
        # Prompt keeps its last 8 tokens (3..10); 12 - 8 = 4 completion tokens each.
        (12, 8, ([3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [21, 22, 23, 24])),
        # Prompt fits max_prompt_length, completions cut to 15 - 10 = 5: rejected (5) untouched.
        (15, 10, (PROMPT, [11, 12, 13, 14, 15], REJECTED)),
        # The prompt alone would fill max_length = 6: it is cut to 5 to leave one token.
        (6, 20, ([6, 7, 8, 9, 10], [11], [21])),
        # No limits at all.
        (None, None, (PROMPT, CHOSEN, REJECTED)),
    ],
)
def test_truncate_ids_hand_checked(max_length, max_prompt_length, expected):
    assert truncate_ids(PROMPT, CHOSEN, REJECTED, max_length, max_prompt_length) == expected


def test_truncation_keeps_bos_in_front():
    bos = 0
    prompt = [bos] + PROMPT  # 11 tokens
    # The last 3 prompt tokens stay, after the BOS: 4 tokens in all.
    assert truncate_ids(prompt, CHOSEN, REJECTED, 6, 4, keep_first=bos) == (
        [bos, 8, 9, 10],
        [11, 12],
        [21, 22],
    )
    # A prompt not starting with BOS is cut plainly.
    assert truncate_ids(PROMPT, CHOSEN, REJECTED, 6, 4, keep_first=bos)[0] == [7, 8, 9, 10]


def test_tokenize_truncates_and_counts(tokenizer):
    """Token counts with the tiny tokenizer (EOS included in completions):

    row 0: prompt 18, chosen " Yes indeed." 10, rejected " No." 5
    row 1: prompt "Hi." 3, chosen " Bad terrible ... dreadful." 14, rejected 5
    max_length 12, max_prompt_length 6:
    row 0: prompt 18 -> 6 (its last 6), room 12 - 6 = 6: chosen 10 -> 6, rejected 5 stays
    row 1: prompt 3 stays, room 9: chosen 14 -> 9, rejected 5 stays
    so 1 prompt, 2 chosen and 0 rejected truncated.
    """
    rows = [
        {
            "prompt": "Good great excellent wonderful superb lovely brilliant amazing.",
            "chosen": " Yes indeed.",
            "rejected": " No.",
        },
        {
            "prompt": "Hi.",
            "chosen": " Bad terrible awful boring dull poor weak dreadful.",
            "rejected": " No.",
        },
    ]
    full, none_cut = tokenize(rows, tokenizer, max_length=None, max_prompt_length=None)
    lengths = [tuple(len(x) for x in t) for t in triples(full)]
    assert lengths == [(18, 10, 5), (3, 14, 5)]
    assert (none_cut.prompt, none_cut.chosen, none_cut.rejected) == (0, 0, 0)

    cut, report = tokenize(rows, tokenizer, max_length=12, max_prompt_length=6)
    assert [tuple(len(x) for x in t) for t in triples(cut)] == [(6, 6, 5), (3, 9, 5)]
    assert (report.rows, report.prompt, report.chosen, report.rejected) == (2, 1, 2, 0)
    for (p, c, r), (fp, fc, fr) in zip(triples(cut), triples(full)):
        assert p == fp[len(fp) - len(p) :]  # the prompt keeps its end
        assert c == fc[: len(c)] and r == fr[: len(r)]  # completions keep their start


LONG_ROWS = [
    {"prompt": "Review: " + "The film was a delight. " * 300, "chosen": " Good" * 500,
     "rejected": " Bad."},
    {"prompt": "Hi", "chosen": "é✓ " * 2000, "rejected": "x" * 5000},
    {"prompt": "<s>" + "Numbers like 0 1 2 3 " * 200, "chosen": " 4", "rejected": " 5"},
    {"prompt": [{"role": "user", "content": "Write about the sea. " * 200}],
     "chosen": [{"role": "assistant", "content": "The sea is wide and blue. " * 200}],
     "rejected": [{"role": "assistant", "content": "No."}]},
]


@pytest.mark.parametrize("adds_bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("chars_per_token", [64, 1], ids=["cut", "cut-falls-short"])
def test_long_texts_are_cut_before_tokenizing_with_the_same_result(
        tokenizer, bos_tokenizer, adds_bos, chars_per_token, monkeypatch):
    """A 10 MB row is cut to a character budget before tokenizing; what truncation keeps and
    counts is the same as after tokenizing it whole. chars_per_token=1 leaves every cut part
    too short, so each is tokenized again whole."""
    tok = bos_tokenizer if adds_bos else tokenizer
    examples = examples_of(LONG_ROWS)
    whole, merged = render_ids(examples, tok)  # no limits given: nothing is cut
    expected, expected_report = truncate_all(whole, 16, 8, tok.bos_token_id)
    expected_report.boundary_merged = merged

    monkeypatch.setattr(tokenize_module, "CUT_CHARS_PER_TOKEN", chars_per_token)
    longest = []
    split = tokenize_module._tokenize_split
    monkeypatch.setattr(tokenize_module, "_tokenize_split", lambda texts, *rest: (
        longest.append(max((len(t) for triple in texts for t in triple), default=0))
        or split(texts, *rest)))
    features, report = tokenize_preferences(examples, tok, max_length=16, max_prompt_length=8)
    assert triples(features) == expected and report == expected_report
    assert (expected_report.prompt, expected_report.chosen, expected_report.rejected) == (3, 3, 1)
    budget = 8 * 64 + 16 * 64  # characters of a cut prompt and a cut completion
    if chars_per_token == 64:
        assert longest == [budget, 0]  # texts tokenized once, cut
    else:
        assert longest[1] > budget  # every cut part fell short: tokenized again whole


@pytest.mark.parametrize(
    "kwargs",
    [{"max_length": 1}, {"max_length": 2.5}, {"max_prompt_length": 0}, {"max_length": True}],
)
def test_limits_are_validated(tokenizer, kwargs):
    with pytest.raises(ConfigError, match="must be an integer"):
        tokenize(EXPLICIT_ROWS[:1], tokenizer, **kwargs)


def test_kept_columns_reach_the_features(tokenizer):
    row = dict(EXPLICIT_ROWS[0], margin=1.5, weight=2, source="human", id="r1")
    (f,), _ = tokenize([row], tokenizer)
    assert {k: f[k] for k in ("margin", "weight", "source", "id")} == {
        "margin": 1.5,
        "weight": 2.0,
        "source": "human",
        "id": "r1",
    }
    (plain,), _ = tokenize(EXPLICIT_ROWS[:1], tokenizer)
    assert set(plain) == {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}
