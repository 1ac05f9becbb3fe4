"""Word lists for the RULER-style tasks, drawn from the embedded corpus (no download).

RULER takes its words from the `wonderwords` package; we take lower-case words of 4 to 9
letters that occur at least 5 times in the corpus's train split, in alphabetical order, so the
list is the same on every machine and needs nothing but the shipped corpus.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

import numpy as np

__all__ = ["choose_words", "corpus_words"]


@lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """Sorted lower-case words (4-9 letters, >= 5 occurrences) of the train split."""
    from megatron_ext.data.corpus import load_documents

    counts: Counter[str] = Counter()
    for doc in load_documents("train"):
        counts.update(re.findall(r"\b[a-z]{4,9}\b", doc.text))
    return tuple(sorted(w for w, c in counts.items() if c >= 5))


def choose_words(rng: np.random.Generator, k: int, words: tuple[str, ...] | None = None
                 ) -> list[str]:
    """`k` distinct words, none a substring of another (so substring scoring is unambiguous).

    Raises:
        ValueError: if the list has fewer than `k` words.
    """
    pool = corpus_words() if words is None else words
    if k > len(pool):
        raise ValueError(f"asked for {k} distinct words; the list has {len(pool)}")
    chosen: list[str] = []
    for i in rng.permutation(len(pool)):
        w = pool[i]
        if all(w not in c and c not in w for c in chosen):
            chosen.append(w)
            if len(chosen) == k:
                return chosen
    raise ValueError(f"could not find {k} words of which none contains another")
