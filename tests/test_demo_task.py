"""The built-in sentiment task: the ground-truth scorer and the generators."""

import pytest

from prefalign.demo.task import (
    ground_truth_scorer,
    review_corpus,
    review_prompts,
    sentiment_score,
)


@pytest.mark.parametrize("text, score", [
    ("", 0.5),                                  # (0 + 0.5) / (0 + 0 + 1)
    ("it was wonderful", 0.75),                 # (1 + 0.5) / (1 + 0 + 1)
    ("Wonderful and MOVING!", 2.5 / 3),         # case and punctuation ignored
    ("wonderful but boring", 0.5),              # one of each
    ("awful, dull and i hated it", 0.5 / 4),    # three negative
])
def test_sentiment_score_by_hand(text, score):
    assert sentiment_score(text) == pytest.approx(score)


def test_scorer_interface_and_determinism():
    assert ground_truth_scorer(["p", "q"], ["great", "poor"]) == [0.75, 0.25]
    assert review_corpus(5, seed=3) == review_corpus(5, seed=3)
    assert review_corpus(5, seed=3) != review_corpus(5, seed=4)


def test_corpus_has_mixed_sentiment_and_prompts_are_neutral():
    scores = [sentiment_score(r) for r in review_corpus(400)]
    assert min(scores) < 0.2 and max(scores) > 0.8
    assert 0.4 < sum(scores) / len(scores) < 0.6
    assert all(sentiment_score(p) == 0.5 for p in review_prompts(50))


def test_word_level_tokenizer_keeps_words_whole():
    from prefalign.tiny import build_tokenizer

    tokenizer = build_tokenizer(review_corpus(200), vocab_size=400, kind="word")
    ids = tokenizer(" wonderful and clumsy.", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["wonderful", "and", "clumsy", "."]
    assert tokenizer.convert_ids_to_tokens(tokenizer("splendid")["input_ids"]) == ["<unk>"]
    assert sentiment_score(tokenizer.decode(ids)) == sentiment_score(" wonderful and clumsy.")
