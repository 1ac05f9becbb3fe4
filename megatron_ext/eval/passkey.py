"""Passkey retrieval: the Landmark / LongHeads / ChunkLlama prompt, depth x length grid.

The prompt is five lines joined with "\\n" (docs/eval.md gives them verbatim): an instruction,
a garbage prefix, the key sentence, a garbage suffix and the question "What is the pass key? The
pass key is". The garbage is the noise sentence repeated and cut in characters, prefix and
suffix both from the start of the filler, as in the original test. The total garbage length is
binary-searched so the prompt plus the answer is exactly as long in tokens as asked (within a
token or two); the prefix is `int(depth * n_garbage)` characters (ChunkLlama's fixed-depth
form). The key is drawn from [1, 50000] (Landmark; `key_range` changes it). The answer is the
key with its leading space, `" 12345"`, and the model is asked for as many tokens as that.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_ext.eval.samples import FILLER, Sample, encode, fit_count, sample_rng

__all__ = ["DEFAULT_DEPTHS", "TASK", "generate", "passkey_prompt"]

TASK = "passkey"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
          "them. I will quiz you about the important information there.")
_KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(key: int, n_garbage: int, depth: float) -> str:
    """The prompt text with `n_garbage` characters of filler, the key at `depth` of it.

    Args:
        key: the pass key.
        n_garbage: characters of filler around the key line (prefix + suffix).
        depth: fraction of the filler before the key line, in [0, 1].
    """
    garbage = " ".join([FILLER] * (n_garbage // len(FILLER) + 2))
    n_prefix = int(depth * n_garbage)
    prefix, suffix = garbage[:n_prefix], garbage[: n_garbage - n_prefix]
    return "\n".join([_INTRO, prefix, _KEY_LINE.format(key=key), suffix, _QUESTION])


def generate(
    tokenizer,
    length: int,
    *,
    seed: int,
    trials: int = 10,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    key_range: tuple[int, int] = (1, 50000),
) -> list[Sample]:
    """Passkey samples at one length: `trials` per depth, in depth-major order.

    Args:
        tokenizer: a `tokenizers.Tokenizer`.
        length: L, the most tokens of prompt + answer.
        seed: run seed; each sample draws from its own stream (see `sample_rng`).
        trials: samples per depth.
        depths: fractions in [0, 1].
        key_range: inclusive range of the key.

    Returns:
        len(depths) * trials samples; `references` holds the key as a string.

    Raises:
        LengthError: if L cannot hold the prompt with no filler.
        ValueError: a depth outside [0, 1], trials < 1, or an empty key range.
    """
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"passkey depth {d!r}; expected a fraction in [0, 1]")
    if trials < 1:
        raise ValueError(f"trials={trials}; expected >= 1")
    lo, hi = key_range
    if not 0 <= lo <= hi:
        raise ValueError(f"key_range={key_range}; expected 0 <= low <= high")
    out = []
    for depth in depths:
        cell = round(depth * 10_000)  # keyed by the depth, not its place in the list
        for trial in range(trials):
            rng = sample_rng(seed, TASK, length, cell, trial)
            key = int(rng.integers(lo, hi + 1))
            answer = encode(tokenizer, f" {key}")
            n_garbage, prompt = fit_count(
                lambda n, key=key, depth=depth: encode(tokenizer, passkey_prompt(key, n, depth)),
                length - len(answer), upper=6 * length, what=f"passkey at length {length}")
            out.append(Sample(TASK, length, trial, tuple(prompt), tuple(answer), (str(key),),
                              depth=float(depth), meta={"key": key, "n_garbage": n_garbage}))
    return out
