"""Greedy decoding with the teacher-forced shortcut equals step-by-step greedy decoding.

The model is a deterministic causal toy: the logits at position i are a fixed random table row
indexed by a hash of tokens[:i+1], so every prediction depends on the whole prefix (a wrong
shortcut would show) and ties are impossible. Token lists are compared exactly; the pass count
shows the shortcut works (one pass when the guess is the greedy answer).
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.eval.generation import greedy_decode

V = 11
TABLE = torch.randn(97, V, generator=torch.Generator().manual_seed(1))


def toy_logits(tokens: torch.Tensor, *, seq_len: int) -> torch.Tensor:
    assert tokens.shape[0] == 1 and seq_len >= tokens.shape[1]
    rows, h = [], 7
    for t in tokens[0].tolist():
        h = (h * 31 + t + 1) % 97
        rows.append(TABLE[h])
    return torch.stack(rows)[None]


def naive(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(toy_logits(torch.tensor([seq]), seq_len=len(prompt) + n)[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("n", [1, 2, 6])
def test_matches_naive_for_any_guess(n):
    prompt = [3, 1, 4, 1, 5]
    want = naive(prompt, n)
    wrong = [(t + 1) % V for t in want]
    for guess, max_passes in [(want, 1), ([], n), (wrong, n), (want[:1] + wrong[1:], n),
                              (want + [0, 0], 1)]:
        got, passes = greedy_decode(toy_logits, prompt, n, guess)
        assert got == want
        assert passes <= max_passes


def test_half_right_guess_saves_passes():
    prompt = [2, 7, 1, 8]
    want = naive(prompt, 6)
    guess = want[:3] + [(want[3] + 1) % V] + want[4:]
    got, passes = greedy_decode(toy_logits, prompt, 6, guess)
    assert got == want and passes == 3  # tokens 0-3 in pass 1, then one pass each for 4 and 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty prompt"):
        greedy_decode(toy_logits, [], 2)
    with pytest.raises(ValueError, match="n_new=0"):
        greedy_decode(toy_logits, [1], 0)
