"""The built-in task: steer short movie reviews toward positive sentiment.

Modelled on the controlled-sentiment experiment of the DPO paper (Rafailov et al. 2023,
arXiv:2305.18290, section 6.1, IMDb): prompts are the openings of reviews, the goal is a
positive continuation, and a fixed ground-truth scorer plays the human. Here the reviews
are synthetic, generated from a small grammar with a sentiment knob, and the scorer is a
lexicon: the share of positive among the sentiment words of the continuation.

Everything is a pure function of a seed, so the demo is the same on every machine.
"""

from __future__ import annotations

import random
import re

SUBJECTS = ["the film", "this movie", "the acting", "the story", "the ending", "the plot",
            "the cast", "the script", "the music", "the director's work", "the second half",
            "the lead actor", "the dialogue", "the pacing", "the camera work", "the finale"]
OPENERS = ["I watched it last night and", "Honestly,", "From the first scene", "After an hour",
           "To be fair,", "My friends agreed that", "In the end", "Overall,"]
POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "clever",
            "beautiful", "gripping", "excellent", "warm", "funny", "great", "lovely",
            "fantastic", "memorable", "touching", "stunning"]
NEGATIVE = ["boring", "awful", "dull", "clumsy", "terrible", "tedious", "lazy", "weak",
            "messy", "painful", "bland", "silly", "poor", "dreadful", "forgettable",
            "annoying", "flat", "disappointing"]
VERBS_POS = ["loved", "enjoyed", "adored", "admired"]
VERBS_NEG = ["hated", "disliked", "regretted", "endured"]
LINKS = ["was", "felt", "seemed", "is", "looked"]
FILLERS = ["really", "quite", "very", "rather", "so", "truly"]

_WORD = re.compile(r"[a-z']+")
_POS = set(POSITIVE) | set(VERBS_POS)
_NEG = set(NEGATIVE) | set(VERBS_NEG)


def sentiment_score(text: str) -> float:
    """Ground truth in [0, 1]: (positive + 0.5) / (positive + negative + 1).

    Counts lexicon words of the text; a text with no sentiment word scores 0.5, one
    positive word 0.75, two positive 0.833, one of each 0.5.
    """
    words = _WORD.findall(text.lower())
    pos = sum(w in _POS for w in words)
    neg = sum(w in _NEG for w in words)
    return (pos + 0.5) / (pos + neg + 1)


def ground_truth_scorer(prompts: list[str], responses: list[str]) -> list[float]:
    """The scorer interface (prompts, responses) -> scores; only the response counts."""
    return [sentiment_score(r) for r in responses]


ground_truth_scorer.batched = True  # one call scores a whole batch


def _adjective(rng: random.Random, positive: bool) -> str:
    return rng.choice(POSITIVE if positive else NEGATIVE)


def _sentence(rng: random.Random, p_positive: float) -> str:
    pos = rng.random() < p_positive
    kind = rng.randrange(3)
    if kind == 0:
        return (f"{rng.choice(SUBJECTS)} {rng.choice(LINKS)} {rng.choice(FILLERS)} "
                f"{_adjective(rng, pos)}")
    if kind == 1:
        return (f"i {rng.choice(VERBS_POS if pos else VERBS_NEG)} {rng.choice(SUBJECTS)}, "
                f"it {rng.choice(LINKS)} {_adjective(rng, pos)}")
    second = rng.random() < p_positive
    return (f"{rng.choice(SUBJECTS)} {rng.choice(LINKS)} {_adjective(rng, pos)} and "
            f"{_adjective(rng, second)}")


def make_review(rng: random.Random, p_positive: float, sentences: int = 3) -> str:
    """A review of `sentences` clauses; each sentiment word is positive with p_positive."""
    opener = rng.choice(OPENERS)
    body = ". ".join(_sentence(rng, p_positive) for _ in range(sentences))
    return f"{opener} {body}."


def review_continuation(rng: random.Random) -> str:
    """What a policy writes after a prompt: one to three clauses of one random sentiment
    level, without the opener (the judge of the hybrid loop learns from such texts)."""
    p_positive = rng.random()
    return ". ".join(_sentence(rng, p_positive) for _ in range(rng.randint(1, 3))) + "."


def review_corpus(n: int, seed: int = 0) -> list[str]:
    """Reviews of mixed sentiment (p_positive uniform in [0, 1]) for pre-training/SFT."""
    rng = random.Random(seed)
    return [make_review(rng, rng.random(), rng.randint(2, 4)) for _ in range(n)]


def review_prompts(n: int, seed: int = 1) -> list[str]:
    """Openings of reviews: the opener and a subject, which carry no sentiment."""
    rng = random.Random(seed)
    return [f"{rng.choice(OPENERS)} {rng.choice(SUBJECTS)} {rng.choice(LINKS)}"
            for _ in range(n)]


def noisy_scorer(sigma: float, seed: int = 0):
    """The ground truth plus Gaussian noise, like annotators who sometimes disagree.

    The noise of a (prompt, response) pair is a pure function of its text and the seed,
    so a rerun labels the same pairs the same way.
    """
    import hashlib

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses):
            digest = hashlib.sha256(f"{seed}\0{p}\0{r}".encode()).digest()
            noise = random.Random(int.from_bytes(digest[:8], "big")).gauss(0.0, sigma)
            out.append(sentiment_score(r) + noise)
        return out

    score.batched = True
    return score
