"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus).

Megatron-core's sampler (``TextGenerationController._torch_sampling_func``) is a method of its
text-generation controller and refuses top-k together with top-p; this one is a plain function
of the logits, takes both (top-k first, then top-p on what is left), and draws from an explicit
``torch.Generator`` so that a seed reproduces a generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Attributes:
        temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of most likely tokens whose probability reaches p
            (1 = all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r}; expected a number >= 0 "
                             "(0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}; expected an int >= 0 (0 = off)")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r}; expected a number in (0, 1] (1 = off)")


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose one token per row.

    Args:
        logits: [B, V] next-token logits (any float dtype; computed in fp32).
        params: the sampling rule.
        generator: random source for sampling (on logits' device); None = torch's global one.

    Returns:
        int64 [B] token ids.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.float() / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = sorted_z.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first survives).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(z.softmax(dim=-1), 1, generator=generator).squeeze(-1)
