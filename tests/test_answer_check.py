"""The math/text answer check (scoring.answer_check), by hand, and its scorer."""

import pytest

from prefalign.errors import PrefalignError
from prefalign.scoring import load_scorer
from prefalign.scoring.answer_check import check_answer, last_boxed, last_number, parse_number


@pytest.mark.parametrize("response, answer, right", [
    ("2 + 3 = 5, so 7 - 2 = 5. The answer is 5.", 5, True),       # last number
    ("First 12, then 13", "12", False),                             # only the last counts
    ("We get \\boxed{42}. Check: 41 + 1 = 42, and 7", 42, True),    # boxed beats last number
    ("so \\boxed{\\frac{3}{4}}", "3/4", True),                      # \frac = 3/4 = 0.75
    ("the ratio is 3/4", 0.75, True),
    ("the ratio is 0.75", "3/4", True),
    ("half: 1/2", "3/4", False),
    ("It drops to -17 degrees", -17, True),
    ("It drops to 17 degrees", -17, False),
    ("a total of 1,234,567 dollars", 1234567, True),               # commas in thousands
    ("$1,000.50 in all", "1000.5", True),
    ("about 1000.0000001", 1000, True),                             # within 1e-6 relative
    ("about 1000.01", 1000, False),
    ("no number here at all", 3, False),                            # no number: wrong
    ("", 0, False),
    ("Work...\n#### 72", "Natalia sold 48 ... #### 72", True),      # GSM8K reference form
    ("The capital is\n  PARIS. ", "Paris", True),                    # text: case, space, period
    ("\\boxed{ New   York }", "new york", True),
    ("Answer: London", "Paris", False),
    ("some text", None, False),                                     # no reference: wrong
])
def test_check_answer_by_hand(response, answer, right):
    assert check_answer(response, answer) is right


def test_the_pieces():
    assert last_boxed("\\boxed{1} then \\boxed{x^{2}}") == "x^{2}"  # nested braces kept
    assert last_boxed("\\boxed{unclosed") is None
    assert last_number("from -2.5 to 3") == 3.0 and last_number("x2 y3") is None
    assert parse_number("-1,234.5") == -1234.5 and parse_number("3/0") is None
    assert parse_number("x = 3") is None and parse_number("-") is None


def test_math_answer_scorer_reads_the_answer_column():
    scorer = load_scorer("math_answer")
    got = scorer(["q1", "q2", "q3"], ["so 4", "\\boxed{7}", "none"],
                 {"answer": [4, "8", 0]})
    assert got == [1.0, 0.0, 0.0]
    assert scorer(["q"], ["12"], {"reference": ["12"]}) == [1.0]
    with pytest.raises(PrefalignError, match="'answer'"):
        scorer(["q"], ["12"])
