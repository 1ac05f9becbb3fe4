"""Aggregation tasks, RULER style: common words (`cwe`) and frequent coded words (`fwe`).

`cwe`: a numbered list of corpus words in which `num_common` = 10 words appear `freq_common`
times each and every other word `freq_rare` times; the model names the 10 common words. RULER
uses 30 and 3 repetitions; lists that short lengths can hold are too small for that, so the
frequencies shrink with the length (30/3 from 4,096 tokens on, 2/1 at 512) and the number of
rare words is binary-searched to fill the length.

`fwe`: coded words (five random lower-case letters) whose counts follow a Zipf law with
exponent `alpha` = 2 (count of rank r proportional to r^-alpha, rounded down), shuffled; the
model names the three most frequent. Counts are set, not sampled, so the top three are strict.

Both are scored with `string_match_all` (share of reference words in the answer).
"""

from __future__ import annotations

import string

import numpy as np

from megatron_ext.eval.samples import LengthError, Sample, encode, fit_count, sample_rng
from megatron_ext.eval.words import choose_words, corpus_words

__all__ = ["cwe_frequencies", "generate_cwe", "generate_fwe"]

_CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than "
              "others. Memorize the ones that appear most often.")
_CWE_QUESTION = ("Question: What are the {n} most common words in the list above? Answer: The top "
                 "{n} words that appear most often in the list are:")
_FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. Find the "
              "three most frequently appeared coded words.")
_FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. What "
                 "are the three most frequently appeared words in the above coded text? Answer: "
                 "According to the coded text above, the three most frequently appeared words "
                 "are:")


def cwe_frequencies(length: int) -> tuple[int, int]:
    """(freq_common, freq_rare) for a length: 30/3 at >= 4096 tokens, scaled down below."""
    if length >= 4096:
        return 30, 3
    common = max(2, 30 * length // 4096)
    return common, max(1, common // 10)


def _cwe_text(common: list[str], rare: list[str], fc: int, fr: int, rng_perm: np.ndarray,
              n_rare: int) -> str:
    items = [w for w in common for _ in range(fc)] + [w for w in rare[:n_rare] for _ in range(fr)]
    order = rng_perm[rng_perm < len(items)]  # one fixed permutation, restricted to the items
    lines = [f"{i + 1}. {items[j]}" for i, j in enumerate(order)]
    q = _CWE_QUESTION.format(n=len(common))
    return "\n".join([_CWE_INTRO, "\n".join(lines), q])


def generate_cwe(tokenizer, length: int, *, seed: int, trials: int = 10, num_common: int = 10
                 ) -> list[Sample]:
    """`trials` common-word samples at one length; `references` are the common words."""
    fc, fr = cwe_frequencies(length)
    pool = corpus_words()
    max_rare = min(length // 4, len(pool) - 4 * num_common)  # a list line is >= 4 tokens
    out = []
    for trial in range(trials):
        rng = sample_rng(seed, "cwe", length, 0, trial)
        common = choose_words(rng, num_common)
        # rare words never contain a common word nor sit inside one (substring scoring)
        rare = [pool[i] for i in rng.permutation(len(pool))
                if all(pool[i] not in c and c not in pool[i] for c in common)][:max_rare]
        perm = rng.permutation(num_common * fc + len(rare) * fr)
        answer = encode(tokenizer, " " + " ".join(common))
        n, prompt = fit_count(
            lambda k, c=common, r=rare, p=perm: encode(tokenizer, _cwe_text(c, r, fc, fr, p, k)),
            length - len(answer), upper=len(rare), what=f"cwe at length {length}")
        if n == len(rare):
            raise LengthError(f"cwe at length {length}: the {len(rare)} available rare words "
                              f"fill only {len(prompt)} tokens; use a length of at most "
                              f"{len(prompt) + len(answer)}")
        out.append(Sample("cwe", length, trial, tuple(prompt), tuple(answer), tuple(common),
                          meta={"freq_common": fc, "freq_rare": fr, "rare_words": n}))
    return out


def _zipf_counts(n_words: int, alpha: float, vocab: int) -> np.ndarray:
    """Counts of ranks 1..vocab for about `n_words` words: floor(n * r^-alpha / H)."""
    w = np.arange(1, vocab + 1, dtype=np.float64) ** -alpha
    return np.floor(n_words * w / w.sum()).astype(np.int64)


def _fwe_text(codes: list[str], counts: np.ndarray, rng_perm: np.ndarray) -> str:
    items = [c for c, k in zip(codes, counts) for _ in range(int(k))]
    order = rng_perm[rng_perm < len(items)]
    body = " ".join(items[j] for j in order)
    return "\n".join([_FWE_INTRO, "", body + " ....", _FWE_QUESTION])


def generate_fwe(tokenizer, length: int, *, seed: int, trials: int = 10, alpha: float = 2.0,
                 vocab: int = 50) -> list[Sample]:
    """`trials` frequent-word samples at one length; `references` are the top three words."""
    out = []
    letters = np.array(list(string.ascii_lowercase))
    for trial in range(trials):
        rng = sample_rng(seed, "fwe", length, 0, trial)
        codes: list[str] = []
        while len(codes) < vocab:
            c = "".join(rng.choice(letters, 5))
            if c not in codes:
                codes.append(c)
        perm = rng.permutation(2 * length)
        answer = encode(tokenizer, " " + " ".join(codes[:3]))

        def build(n: int, codes=codes, perm=perm) -> list[int]:
            return encode(tokenizer, _fwe_text(codes, _zipf_counts(n, alpha, vocab), perm))

        n, prompt = fit_count(build, length - len(answer), upper=2 * length,
                              what=f"fwe at length {length}")
        counts = _zipf_counts(n, alpha, vocab)
        if not counts[0] > counts[1] > counts[2] > counts[3]:
            raise ValueError(f"fwe at length {length}: only {n} coded words fit, too few for a "
                             f"strict top three (counts {counts[:4].tolist()}); use a longer "
                             "length")
        out.append(Sample("fwe", length, trial, tuple(prompt), tuple(answer), tuple(codes[:3]),
                          meta={"alpha": alpha, "words": int(counts.sum()),
                                "top_counts": counts[:4].tolist()}))
    return out
