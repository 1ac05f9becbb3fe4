"""Variable tracking (RULER `vt`): follow a chain of assignments through noise.

One chain of `hops` + 1 variables: "VAR ABCDE = 12345.", then "VAR FGHIJ = VAR ABCDE." and so
on, each name five random capital letters, the value in [10000, 99999]. The statements are
spread over the noise haystack in chain order at evenly spaced places with a random offset. The
question asks for every variable holding the value; the answer is the names in chain order,
space-separated, and the score is the share of names found in the generated text
(`string_match_all`, partial credit).
"""

from __future__ import annotations

import string

import numpy as np

from megatron_ext.eval.samples import FILLER, Sample, encode, fit_count, sample_rng

__all__ = ["TASK", "generate", "vt_prompt"]

TASK = "vt"
_INTRO = "Memorize and track the chain of variable assignments hidden in the following text."
_QUESTION = ("Question: Find all variables that are assigned the value {value} in the text above. "
             "Answer: According to the chain of variable assignments in the text above, {n} "
             "variables are assigned the value {value}, they are:")


def _chain(names: list[str], value: int) -> list[str]:
    first = [f"VAR {names[0]} = {value}."]
    return first + [f"VAR {b} = VAR {a}." for a, b in zip(names[:-1], names[1:])]


def vt_prompt(names: list[str], value: int, offsets: np.ndarray, n_units: int) -> str:
    """Prompt with the chain's statements after `offsets * n_units` noise repetitions.

    Args:
        names: the chain's variables, first assigned `value`.
        offsets: non-decreasing fractions in [0, 1], one per statement.
        n_units: noise repetitions.
    """
    slots: list[list[str]] = [[] for _ in range(n_units + 1)]
    for stmt, off in zip(_chain(names, value), offsets):
        slots[int(round(float(off) * n_units))].append(stmt)
    parts: list[str] = []
    for i, slot in enumerate(slots):
        parts.extend(slot)
        if i < n_units:
            parts.append(FILLER)
    return "\n".join([_INTRO, "", " ".join(parts),
                      _QUESTION.format(value=value, n=len(names))])


def _names(rng: np.random.Generator, k: int) -> list[str]:
    letters = np.array(list(string.ascii_uppercase))
    out: list[str] = []
    while len(out) < k:
        name = "".join(rng.choice(letters, 5))
        if name not in out:
            out.append(name)
    return out


def generate(tokenizer, length: int, *, seed: int, trials: int = 10, hops: int = 4
             ) -> list[Sample]:
    """`trials` variable-tracking samples at one length.

    Returns:
        Samples whose `references` are the chain's names in order.

    Raises:
        LengthError: if L cannot hold the chain and question with no noise.
        ValueError: hops < 1 or trials < 1.
    """
    if hops < 1 or trials < 1:
        raise ValueError(f"hops={hops}, trials={trials}; expected both >= 1")
    out = []
    for trial in range(trials):
        rng = sample_rng(seed, TASK, length, 0, trial)
        names = _names(rng, hops + 1)
        value = int(rng.integers(10000, 100000))
        # evenly spread statements, each jittered inside its share of the haystack
        offsets = (np.arange(hops + 1) + rng.random(hops + 1)) / (hops + 1)
        answer = encode(tokenizer, " " + " ".join(names))
        n, prompt = fit_count(
            lambda k, nm=names, v=value, o=offsets: encode(tokenizer, vt_prompt(nm, v, o, k)),
            length - len(answer), upper=length // 8 + 1, what=f"vt at length {length}")
        out.append(Sample(TASK, length, trial, tuple(prompt), tuple(answer), tuple(names),
                          meta={"value": value, "names": names, "units": n}))
    return out
