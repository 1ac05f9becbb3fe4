"""Greedy decoding by full forward passes, with a teacher-forced shortcut.

The answers the tasks ask for are short (a pass key is six tokens), so greedy decoding without a
KV cache is affordable: each pass runs the model on prompt + tokens so far. The shortcut: feed
the reference answer after the prompt in the same pass. The prediction at the first answer
position is the first greedy token; while each prediction equals the token fed at that place,
the next prediction is also a greedy token (it was conditioned on exactly the greedy prefix).
The first mismatch is still a valid greedy token; from there on, one pass per token. A correct
answer therefore costs one pass, and the result is identical to step-by-step greedy decoding.

Length rules that depend on the sequence length (dynamic NTK, DCA's temperature) get the fixed
`seq_len` = prompt + answer budget in every pass, so all passes see the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["greedy_decode"]

LogitsFn = Callable[..., torch.Tensor]


def greedy_decode(
    logits_fn: LogitsFn,
    prompt: Sequence[int],
    n_new: int,
    guess: Sequence[int] = (),
) -> tuple[list[int], int]:
    """Greedy continuation of `prompt` by `n_new` tokens.

    Args:
        logits_fn: (tokens [1, S], seq_len=int) -> logits [1, S, V].
        prompt: prompt token ids (non-empty).
        n_new: tokens to generate (>= 1).
        guess: a likely continuation (the reference answer); only speeds things up.

    Returns:
        (the n_new greedy token ids, the number of forward passes used).
    """
    if not prompt:
        raise ValueError("greedy_decode needs a non-empty prompt")
    if n_new < 1:
        raise ValueError(f"n_new={n_new}; expected >= 1")
    prompt, guess = list(prompt), list(guess)[:n_new]
    seq_len = len(prompt) + n_new
    out: list[int] = []
    passes = 0
    while len(out) < n_new:
        rest = guess[len(out):] if guess[:len(out)] == out else []
        rest = rest[: n_new - len(out) - 1]  # the last token needs no input slot
        tokens = torch.tensor([prompt + out + rest], dtype=torch.long)
        logits = logits_fn(tokens, seq_len=seq_len)
        passes += 1
        start = len(prompt) + len(out) - 1
        pred = logits[0, start:].argmax(-1).tolist()
        for i, p in enumerate(pred):
            out.append(int(p))
            if len(out) == n_new or i >= len(rest) or p != rest[i]:
                break
    return out, passes
