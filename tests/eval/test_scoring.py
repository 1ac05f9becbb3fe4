"""Scorers on hand-made inputs whose scores are worked out by hand in each assertion.

Exact values: the scores are ratios of small integers, so they are compared with ==.
"""

from __future__ import annotations

import pytest

from megatron_ext.eval.scoring import (
    exact_match,
    leading_integer,
    passkey_scores,
    score_sample,
    string_match_all,
)


def test_passkey_exact_first_digit_and_digits():
    assert passkey_scores(" 12345", "12345") == {"exact": 1.0, "first_digit": 1.0, "digits": 1.0}
    assert passkey_scores(" 12399. The", "12345") == {"exact": 0.0, "first_digit": 1.0,
                                                      "digits": 3 / 5}
    assert passkey_scores(" 1234", "12345") == {"exact": 0.0, "first_digit": 1.0, "digits": 0.8}
    assert passkey_scores(" 123456", "12345")["exact"] == 0.0  # an extra digit is wrong
    assert passkey_scores(" is is", "12345") == {"exact": 0.0, "first_digit": 0.0, "digits": 0.0}
    assert passkey_scores(" 92345", "12345")["digits"] == 0.8
    with pytest.raises(ValueError, match="expected digits only"):
        passkey_scores("1", "12a")


def test_leading_integer():
    assert leading_integer("The key is 0042 and 7") == "0042"
    assert leading_integer("none") == ""


def test_string_match_all_partial_credit_case_insensitive():
    assert string_match_all(" ABCDE FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert string_match_all("Apple, pear", ["apple", "PEAR"]) == 1.0
    assert string_match_all("", ["x"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all("x", [])


def test_exact_match_and_dispatch():
    assert exact_match("  7 ", "7") == 1.0 and exact_match("7.", "7") == 0.0
    assert score_sample("passkey", " 314", ["314"])["score"] == 1.0
    assert score_sample("vt", " AAAAA BBBBB", ["AAAAA", "CCCCC"]) == {"score": 0.5}
