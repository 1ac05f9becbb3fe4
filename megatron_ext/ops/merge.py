"""Exact merge of partial attention results over disjoint key sets.

Maths: docs/methods/conventions.md, "Merging partial results".

Given parts ``(out_k, lse_k)`` computed over disjoint key sets K_1..K_n for the same queries::

    lse = logsumexp_k lse_k,   w_k = exp(lse_k - lse),   out = sum_k w_k * out_k

equals one softmax over the union. This is the only merge point of the package (DCA passes,
ring / all-gather context parallelism, LongHeads decode).

Gradients flow through ``w_k`` by plain autograd, which is the exact backward (form 1 of
"Backward of the merge" in docs/methods/conventions.md: ``dout_k = w_k dout``,
``dlse_k = w_k (<dout, out_k - out> + dlse)``). The weights are never detached: treating them as
constants silently biases the gradient (the released ChunkLlama bug). Only the max used for
numerical stabilisation is detached, which is exact because the result does not depend on it.

Precision: weights and the sum are fp32 (fp64 if any input is fp64) whatever the input dtype;
the merged out and lse are returned in that dtype. Parts with lse = -inf (no visible key) get
weight 0; rows where every part is -inf give out = 0, lse = -inf, and finite gradients.
"""

from __future__ import annotations

import torch

__all__ = ["merge_attn_outputs"]


def merge_attn_outputs(
    outs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    lses: list[torch.Tensor] | tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention outputs exactly; differentiable w.r.t. every out_k and lse_k.

    Args:
        outs: n tensors [B, S, H, D] (finite; 0 on rows with no key in that part).
        lses: n tensors [B, H, S] (natural log; -inf where the part has no visible key).

    Returns:
        (out [B, S, H, D], lse [B, H, S]), both fp32 (fp64 if any input is fp64).
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"len(outs)={len(outs)}, len(lses)={len(lses)}; expected equal and >= 1")
    B, S, H, D = outs[0].shape if outs[0].dim() == 4 else (None,) * 4
    for idx, (o, lse) in enumerate(zip(outs, lses)):
        if o.dim() != 4 or o.shape != outs[0].shape:
            raise ValueError(
                f"outs[{idx}].shape={tuple(o.shape)}; expected [B, S, H, D] equal to outs[0] "
                f"{tuple(outs[0].shape)}"
            )
        if lse.shape != (B, H, S):
            raise ValueError(
                f"lses[{idx}].shape={tuple(lse.shape)}; expected [B, H, S]={(B, H, S)}"
            )
    dtypes = {o.dtype for o in outs} | {lse.dtype for lse in lses}
    cdt = torch.float64 if torch.float64 in dtypes else torch.float32
    ls = torch.stack([lse.to(cdt) for lse in lses])  # [n, B, H, S]
    m = ls.amax(0).detach()
    any_key = torch.isfinite(m)
    m = torch.where(any_key, m, torch.zeros_like(m))
    s = torch.exp(ls - m).sum(0)
    one = torch.ones_like(s)
    lse = torch.where(any_key, m + torch.log(torch.where(any_key, s, one)), m - float("inf"))
    lse_safe = torch.where(any_key, lse, torch.zeros_like(lse))
    w = torch.exp(ls - lse_safe).permute(0, 1, 3, 2).unsqueeze(-1)  # [n, B, S, H, 1]
    out = w[0] * outs[0].to(cdt)
    for k in range(1, len(outs)):
        out = out + w[k] * outs[k].to(cdt)
    return out, lse
