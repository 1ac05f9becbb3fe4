"""Needle in a haystack, RULER style: one key (`niah_single`) or four keys (`niah_multikey`).

The haystack is the noise sentence repeated (RULER's "noise" haystack); needles are sentences
"One of the special magic numbers for {key} is: {value}." placed between repetitions. Keys are
two corpus words joined by a hyphen, values 7-digit numbers. `niah_single` hides one needle at
the requested depth; `niah_multikey` hides four needles with different keys and values, the
queried one at the requested depth and the three distractors at random places, so the model has
to match the key, not just copy the only number in sight. The question and the answer prefix
end the prompt; the answer is the value, scored with `string_match_all`. The number of
repetitions is binary-searched to fill the length.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_ext.eval.samples import FILLER, Sample, encode, fit_count, sample_rng
from megatron_ext.eval.words import choose_words

__all__ = ["DEFAULT_DEPTHS", "SUBTASKS", "generate", "niah_prompt"]

SUBTASKS = {"niah_single": 1, "niah_multikey": 4}
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
          "it. I will quiz you about the numbers afterwards.")
_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_QUESTION = ("What are all the special magic numbers for {key} mentioned in the provided text? "
             "The special magic numbers for {key} mentioned in the provided text are")


def niah_prompt(needles: Sequence[tuple[str, int, float]], query: str, n_units: int) -> str:
    """Prompt with `n_units` noise repetitions and needles (key, value, depth in [0, 1]).

    A needle at depth d goes after `round(d * n_units)` repetitions; needles at the same place
    keep their given order.
    """
    slots: list[list[str]] = [[] for _ in range(n_units + 1)]
    for key, value, depth in needles:
        slots[round(depth * n_units)].append(_NEEDLE.format(key=key, value=value))
    parts: list[str] = []
    for i, slot in enumerate(slots):
        parts.extend(slot)
        if i < n_units:
            parts.append(FILLER)
    return "\n".join([_INTRO, " ".join(parts), _QUESTION.format(key=query)])


def generate(
    tokenizer,
    length: int,
    *,
    seed: int,
    trials: int = 10,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    subtasks: Sequence[str] = tuple(SUBTASKS),
) -> list[Sample]:
    """Needle samples at one length: per sub-task, `trials` per depth.

    Returns:
        Samples with task = the sub-task name, `references` = (value,), `meta` = the keys and
        values of every needle and the number of noise repetitions.

    Raises:
        LengthError: if L cannot hold the prompt with no noise.
        ValueError: an unknown sub-task or a depth outside [0, 1].
    """
    for name in subtasks:
        if name not in SUBTASKS:
            raise ValueError(f"needle sub-task {name!r}; expected one of {sorted(SUBTASKS)}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depth {d!r}; expected a fraction in [0, 1]")
    out = []
    for name in subtasks:
        n_keys = SUBTASKS[name]
        for depth in depths:
            cell = round(depth * 10_000)  # keyed by the depth, not its place in the list
            for trial in range(trials):
                rng = sample_rng(seed, name, length, cell, trial)
                words = choose_words(rng, 2 * n_keys)
                keys = [f"{words[2 * i]}-{words[2 * i + 1]}" for i in range(n_keys)]
                values = [int(v) for v in rng.choice(9_000_000, n_keys, replace=False)
                          + 1_000_000]
                where = [float(depth)] + [float(x) for x in rng.random(n_keys - 1)]
                needles = list(zip(keys, values, where))
                order = rng.permutation(n_keys)  # distractors before or after the needle
                needles = [needles[i] for i in order]
                answer = encode(tokenizer, f" {values[0]}")
                n, prompt = fit_count(
                    lambda k, nd=needles, q=keys[0]: encode(tokenizer, niah_prompt(nd, q, k)),
                    length - len(answer), upper=length // 8 + 1, what=f"{name} at length {length}")
                out.append(Sample(name, length, trial, tuple(prompt), tuple(answer),
                                  (str(values[0]),), depth=float(depth),
                                  meta={"query": keys[0], "keys": keys, "values": values,
                                        "units": n}))
    return out
