"""Batches: shapes, chosen-before-rejected order, masks, left vs right padding."""

import pytest
import torch

from prefalign.data.collate import collate_preferences, collate_prompts

PAD = 0
FEATURES = [
    {"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5], "rejected_input_ids": [6]},
    {"prompt_input_ids": [7, 8], "chosen_input_ids": [9], "rejected_input_ids": [10, 11, 12]},
]


def test_right_padding_hand_checked():
    batch = collate_preferences(FEATURES, PAD)
    # Rows 0-1: prompt+chosen of features 0-1; rows 2-3: prompt+rejected. T = 5 (longest).
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 9, 0, 0],
        [1, 2, 3, 6, 0],
        [7, 8, 10, 11, 12],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert batch["completion_mask"].tolist() == [
        [False, False, False, True, True],
        [False, False, True, False, False],
        [False, False, False, True, False],
        [False, False, True, True, True],
    ]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}


def test_left_padding_hand_checked():
    batch = collate_preferences(FEATURES, PAD, padding_side="left")
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [0, 0, 7, 8, 9],
        [0, 1, 2, 3, 6],
        [7, 8, 10, 11, 12],
    ]
    assert batch["completion_mask"].tolist() == [
        [False, False, False, True, True],
        [False, False, False, False, True],
        [False, False, False, False, True],
        [False, False, True, True, True],
    ]


def test_left_and_right_padding_hold_the_same_rows():
    features = FEATURES + [
        {"prompt_input_ids": [13], "chosen_input_ids": [14, 15, 16, 17], "rejected_input_ids": [18]}
    ]
    right = collate_preferences(features, PAD, padding_side="right", pad_to_multiple_of=4)
    left = collate_preferences(features, PAD, padding_side="left", pad_to_multiple_of=4)
    assert right["input_ids"].shape == left["input_ids"].shape == (6, 8)
    for row in range(6):
        r_real, l_real = right["attention_mask"][row].bool(), left["attention_mask"][row].bool()
        assert torch.equal(right["input_ids"][row][r_real], left["input_ids"][row][l_real])
        assert torch.equal(
            right["completion_mask"][row][r_real], left["completion_mask"][row][l_real]
        )
        n = int(r_real.sum())
        assert r_real[:n].all() and not r_real[n:].any()  # right: real tokens first
        assert l_real[-n:].all() and not l_real[:-n].any()  # left: real tokens last


def test_completion_mask_counts_and_excludes_padding_and_prompt():
    for side in ("left", "right"):
        batch = collate_preferences(FEATURES, PAD, padding_side=side)
        expected = [len(f["chosen_input_ids"]) for f in FEATURES] + [
            len(f["rejected_input_ids"]) for f in FEATURES
        ]
        assert batch["completion_mask"].sum(-1).tolist() == expected
        assert not (batch["completion_mask"] & (batch["attention_mask"] == 0)).any()


def test_pad_to_multiple_of():
    batch = collate_preferences(FEATURES, PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (4, 8)
    assert (batch["input_ids"][:, 5:] == PAD).all() and (batch["attention_mask"][:, 5:] == 0).all()


def test_kept_columns():
    features = [
        dict(FEATURES[0], margin=1.5, weight=2.0, source="human", id=3),
        dict(FEATURES[1]),
    ]
    batch = collate_preferences(features, PAD)
    assert batch["margin"].tolist() == [1.5, 0.0]  # absent margin = no margin
    assert batch["weight"].tolist() == [2.0, 1.0]  # absent weight = 1
    assert batch["margin"].dtype == batch["weight"].dtype == torch.float32
    assert batch["source"] == ["human", None] and batch["id"] == [3, None]
    only_weight = collate_preferences([dict(FEATURES[0]), dict(FEATURES[1], weight=0.5)], PAD)
    assert only_weight["weight"].tolist() == [1.0, 0.5]
    assert "margin" not in only_weight and "source" not in only_weight and "id" not in only_weight


def test_collate_prompts_left_pads():
    batch = collate_prompts([[1, 2, 3], [4]], pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        collate_preferences(FEATURES, PAD, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate_preferences(FEATURES, None)
    with pytest.raises(ValueError, match="at least one feature"):
        collate_preferences([], PAD)
    with pytest.raises(ValueError, match="at least one prompt"):
        collate_prompts([], PAD)


def test_end_to_end_from_rows(tokenizer):
    """Rows -> features -> batch: each completion span decodes to the completion text + EOS."""
    from prefalign.data import load_preferences

    rows = [
        {"prompt": "Say it.", "chosen": " Good.", "rejected": " Bad terrible."},
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Go.",
        },
    ]
    features, _ = load_preferences(rows, tokenizer)
    batch = collate_preferences(features, tokenizer.pad_token_id, padding_side="left")
    texts = [tokenizer.decode(batch["input_ids"][i][batch["completion_mask"][i]]) for i in range(4)]
    assert texts == [" Good.</s>", " Hello!</s>", " Bad terrible.</s>", " Go.</s>"]
