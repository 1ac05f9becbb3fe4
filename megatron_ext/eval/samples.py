"""What every synthetic task produces: `Sample`, seeded random streams and length fitting.

A task generator turns (tokenizer, length L, seed) into samples whose prompt plus reference
answer is at most L tokens. The filler ("haystack") is sized by binary search on the real token
count of the whole prompt, never by a characters-per-token guess, so a sample asked for at L
really is L tokens long (to within the one or two tokens a word boundary moves). Every sample's
randomness comes from its own `numpy` stream keyed by (seed, task, length, cell, trial), so a
sample does not change when other lengths, depths or tasks are added to a run.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LengthError", "Sample", "encode", "fit_count", "sample_rng"]

# The noise sentence of the Landmark passkey test and of RULER's noise haystack.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class LengthError(ValueError):
    """A length that the task's fixed text, or the model, cannot hold."""


@dataclass(frozen=True)
class Sample:
    """One prompt of a synthetic task with its reference answer.

    `prompt_ids + answer_ids` is at most `length` tokens. The model is asked for
    `len(answer_ids)` greedy tokens after the prompt; `answer_ids` also serves as the
    teacher-forcing guess that makes greedy decoding cheap (see `generation.py`).
    """

    task: str
    """Task name, e.g. 'passkey' or 'niah_multikey'."""
    length: int
    """The requested length L (prompt + answer <= L tokens)."""
    index: int
    """Trial number inside its (length, depth) cell."""
    prompt_ids: tuple[int, ...]
    """Token ids of the prompt, answer prefix included."""
    answer_ids: tuple[int, ...]
    """Token ids of the reference continuation."""
    references: tuple[str, ...]
    """Strings the scorer looks for in the generated text (one for passkey and needles)."""
    depth: float | None = None
    """Where the needle sits, as a fraction of the haystack (None: no single needle)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Task details worth keeping in the results (the key, the number of filler units, ...)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


def sample_rng(seed: int, task: str, length: int, cell: int, trial: int) -> np.random.Generator:
    """The random stream of one sample, independent of every other sample of the run."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, cell, trial])


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def fit_count(
    build: Callable[[int], Sequence[int]], budget: int, upper: int, *, what: str
) -> tuple[int, Sequence[int]]:
    """Largest n in [0, upper] whose `build(n)` has at most `budget` tokens.

    Binary search; token counts grow with n (a filler unit is never negative text), so the
    result is the largest fitting n up to the odd word boundary that changes a merge.

    Args:
        build: n -> token ids of the prompt with n filler units (characters, sentences, words).
        budget: most tokens allowed.
        upper: largest n worth trying (must give more than `budget` tokens or be the cap).
        what: task description for the error message.

    Returns:
        (n, build(n)).

    Raises:
        LengthError: if even n = 0 does not fit; names the tokens the fixed text needs.
    """
    ids = build(0)
    if len(ids) > budget:
        raise LengthError(
            f"{what}: the task's fixed text alone is {len(ids)} tokens, more than the {budget} "
            "tokens available; use a longer length")
    lo, hi, best = 0, upper, ids
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cand = build(mid)
        if len(cand) <= budget:
            lo, best = mid, cand
        else:
            hi = mid - 1
    return lo, best
