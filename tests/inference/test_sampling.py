"""Sampling rules against their definitions.

Greedy is the argmax; top-k = 1 and a tiny top-p reduce to greedy at any temperature; with
top-k or top-p every draw lies in the kept set, computed here directly from the sorted
probabilities; without filtering, 20 000 draws match softmax(logits / T) to 0.02 per token
(the binomial standard deviation is <= 0.0036, so 0.02 is > 5 sigma); a seeded generator
reproduces draws; invalid parameters are refused with their value named.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.inference import SamplingParams, sample


def _logits() -> torch.Tensor:
    return torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])


def test_greedy_and_its_limits():
    z = _logits()
    want = z.argmax(-1)
    assert torch.equal(sample(z, SamplingParams()), want)
    assert torch.equal(sample(z, SamplingParams(temperature=5.0, top_k=1)), want)
    assert torch.equal(sample(z, SamplingParams(temperature=5.0, top_p=1e-6)), want)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.5, top_k=3),
                                    SamplingParams(temperature=1.0, top_p=0.7),
                                    SamplingParams(temperature=2.0, top_k=4, top_p=0.8)])
def test_draws_stay_in_the_kept_set(params: SamplingParams):
    z = _logits()
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample(z, params, g) for _ in range(2000)], 1)  # [B, n]
    for b in range(z.shape[0]):
        probs, order = (z[b] / params.temperature).softmax(-1).sort(descending=True)
        keep = len(probs) if not params.top_k else params.top_k
        mass = probs[:keep] / probs[:keep].sum() if params.top_p < 1 else probs
        if params.top_p < 1:  # smallest prefix reaching top_p (of what top-k left)
            keep = int((mass.cumsum(0) - mass < params.top_p).sum())
        kept = set(order[:keep].tolist())
        assert set(draws[b].tolist()) == kept


def test_unfiltered_frequencies_match_softmax():
    z = _logits()[:1]
    g = torch.Generator().manual_seed(2)
    n = 20000
    draws = sample(z.expand(n, -1), SamplingParams(temperature=0.7), g)
    freq = torch.bincount(draws, minlength=z.shape[1]).float() / n
    assert (freq - (z[0] / 0.7).softmax(-1)).abs().max() < 0.02


def test_seed_reproduces():
    z = _logits()
    p = SamplingParams(temperature=1.0)
    a = [sample(z, p, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


@pytest.mark.parametrize("kw, match", [({"temperature": -1.0}, "temperature=-1.0"),
                                       ({"top_k": -2}, "top_k=-2"),
                                       ({"top_p": 0.0}, "top_p=0.0"),
                                       ({"top_p": 1.5}, "top_p=1.5")])
def test_invalid_parameters(kw: dict, match: str):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
