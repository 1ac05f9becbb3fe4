"""Perplexity bookkeeping against hand-computed values.

A loss function that returns a known loss per position (a constant, or the position index)
makes every protocol's perplexity a closed form: exp(c) for a constant loss, and for the
truncation protocol's loss-by-position buckets, the mean of the bucket's positions. Floats are
compared with a 1e-9 relative tolerance (sums of at most a few thousand doubles).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.eval.perplexity import (
    held_out_tokens,
    passes_needed,
    perplexity,
    sliding_starts,
)
from megatron_ext.eval.samples import LengthError


def test_sliding_starts():
    assert sliding_starts(10, 4, 2, None) == [0, 2, 4, 6]
    assert sliding_starts(10, 4, 2, 2) == [0, 6]
    assert sliding_starts(3, 4, 2, None) == []
    with pytest.raises(ValueError, match="stride=0"):
        sliding_starts(10, 4, 0, None)


def test_constant_loss_gives_exp_c():
    calls = []

    def losses(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape)
        return torch.full((1, tokens.shape[1] - 1), 1.5)

    out = perplexity(losses, 256, max_docs=2, max_windows=3)
    assert out["truncation"]["ppl"] == pytest.approx(math.exp(1.5), rel=1e-9)
    assert out["sliding"]["ppl"] == pytest.approx(math.exp(1.5), rel=1e-9)
    assert out["truncation"]["docs"] == 2 and out["sliding"]["windows"] == 3
    assert all(shape == (1, 256) for shape in calls)
    assert len(calls) == passes_needed(256, max_docs=2, max_windows=3) == 5


def test_loss_by_position_buckets_and_doc_mean():
    def losses(tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(tokens.shape[1] - 1, dtype=torch.float64)[None] / 100

    out = perplexity(losses, 300, protocols=("truncation",), max_docs=3, bucket=128)
    t = out["truncation"]
    assert t["loss_by_position"] == pytest.approx([63.5 / 100, 191.5 / 100, 277 / 100])
    assert t["ppl"] == pytest.approx(math.exp(149 / 100), rel=1e-9)  # every doc the same


def test_sliding_windows_cover_the_stream_with_separators():
    docs = held_out_tokens("test")[:2]
    seen = []

    def losses(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens[0].clone())
        return torch.zeros(1, tokens.shape[1] - 1)

    out = perplexity(losses, 512, protocols=("sliding",), max_docs=2, stride=512,
                     max_windows=None)
    total = docs[0][1].size + docs[1][1].size + 2
    assert out["sliding"]["stream_tokens"] == total and len(seen) == total // 512
    assert torch.equal(seen[0], torch.from_numpy(docs[0][1][:512]))


def test_too_long_and_bad_protocol_refused():
    longest = max(ids.size for _, ids in held_out_tokens("dev"))
    with pytest.raises(LengthError, match=f"longest dev document has {longest} tokens"):
        perplexity(lambda t: t, longest + 1, split="dev", protocols=("truncation",))
    with pytest.raises(ValueError, match="protocol 'rolling'"):
        perplexity(lambda t: t, 8, protocols=("rolling",))
