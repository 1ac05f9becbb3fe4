"""Scorers: exact match, passkey digit accuracy and RULER's string match.

- `passkey_scores`: the leading integer of the generated text against the key: exact match (the
  whole integer), first digit, and per-digit accuracy (share of the key's digits reproduced at
  their place; a missing digit counts as wrong).
- `string_match_all`: share of the references that occur in the prediction, case-insensitive
  (RULER's metric for needle, variable tracking and word tasks; partial credit).
- `exact_match`: prediction and reference equal after stripping surrounding white space.

All return fractions in [0, 1]; tables print them as percentages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["exact_match", "leading_integer", "passkey_scores", "score_sample", "string_match_all"]


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal once surrounding white space is stripped, else 0.0."""
    return float(prediction.strip() == reference.strip())


def leading_integer(text: str) -> str:
    """The digits of the first integer in `text` ('' if there is none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def passkey_scores(prediction: str, key: str) -> dict[str, float]:
    """{'exact', 'first_digit', 'digits'} of a generated answer against the key.

    Args:
        prediction: the generated text, e.g. " 12345".
        key: the pass key's digits, e.g. "12345".
    """
    if not key.isdigit():
        raise ValueError(f"pass key {key!r}; expected digits only")
    got = leading_integer(prediction)
    digits = sum(a == b for a, b in zip(got, key)) / len(key)
    return {"exact": float(got == key), "first_digit": float(got[:1] == key[:1]),
            "digits": digits}


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Share of `references` found in `prediction`, case-insensitive.

    Raises:
        ValueError: if there are no references.
    """
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    low = prediction.lower()
    return sum(r.lower() in low for r in references) / len(references)


def score_sample(task: str, prediction: str, references: Sequence[str]) -> dict[str, float]:
    """The scores of one sample of `task`; the headline metric is under 'score'."""
    if task == "passkey":
        s = passkey_scores(prediction, references[0])
        return {"score": s["exact"], **s}
    return {"score": string_match_all(prediction, references)}
