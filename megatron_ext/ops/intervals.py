"""Attention where each query row sees one contiguous interval of keys, [lo_r, hi_r).

The generic engine behind every block of context parallelism and every DCA pass. Every DCA
pass has this shape once keys are ordered by (document, position): intra rows see
their chunk up to themselves, successive rows the whole previous chunk, inter rows the document
prefix before that. One pass over *all* query rows is therefore one call here, on the package's
blockwise engine (``blockwise.plan_blocks`` / ``run_forward`` / ``run_backward`` and the tile
kernels behind ``attention_func``): rows are cut where an interval end jumps (chunk and document
edges), keys every row of a block sees become unmasked pieces, a causal diagonal is recognised,
and only ragged edges get explicit mask tiles. Memory is O(S).

Two levels:

- ``interval_forward`` / ``interval_backward``: no autograd. The backward takes (out, lse) as
  arguments, so they may be the *merged* result of several passes or blocks ("ring style",
  ../shared/METHODS.md §0 form 2): then ``P = exp(z - lse)`` is already the global probability
  and ``D_i = rowsum(dO * O) - dlse_i``, and the gradients of all parts are exact.
- ``interval_attention``: one pass as a differentiable (out, lse), exact also for a gradient
  flowing into lse (form 1, for merging by autograd).
"""

from __future__ import annotations

import torch

from megatron_ext.ops import blockwise
from megatron_ext.ops.backend import resolve_backend
from megatron_ext.ops.cpu_flash import FusedCPUTiles, fused_cpu_available

__all__ = ["interval_attention", "interval_backward", "interval_forward", "plan_intervals"]


def _fused(x: torch.Tensor) -> bool:
    """Fused CPU tiles (True) or plain torch tiles (False), as ``backend`` resolves them."""
    name = resolve_backend(x, "intervals")
    if name in ("cpu_fused", "cpu_blockwise"):
        if x.device.type != "cpu" or not fused_cpu_available():
            raise ValueError(f"backend {name!r} needs CPU tensors and torch's fused CPU kernel")
        return True
    if name != "torch_blockwise":
        raise ValueError(
            f"backend {name!r} has no kernel for per-row key intervals (CP blocks, DCA passes); "
            "use 'torch_blockwise' or 'cpu_blockwise'"
        )
    return False


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Tile kernel for [B, H, S, D] views: fused ATen on CPU, plain torch elsewhere."""
    if _fused(q):  # fp32 maths for half inputs: partial results get merged afterwards
        return FusedCPUTiles(q, k, v, scale, upcast=True)
    return blockwise.TorchTiles(q, k, v, scale)


def plan_intervals(
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    like: torch.Tensor,
    causal_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[blockwise.Block]]:
    """Normalise the bounds and plan query blocks and key pieces for them.

    Args:
        lo, hi: int [Bp, Sq] (Bp = 1 or B) key index bounds; lo >= hi means no key.
        like: a query tensor [B, Sq, H, D] (its device picks the kernel and tile sizes).
        causal_offset: optional hint that ``hi[:, r] == causal_offset + r + 1`` on many rows,
            so the planner can use the causal diagonal tile there. Only a hint: the bounds
            alone decide what is visible.

    Returns:
        (lo, hi, plan) with lo, hi CPU int64 and hi >= lo.
    """
    lo, hi = lo.to("cpu", torch.int64).contiguous(), hi.to("cpu", torch.int64).contiguous()
    hi = torch.maximum(hi, lo)
    fused = _fused(like)
    plan = blockwise.plan_blocks(
        lo,
        hi,
        causal=causal_offset is not None,
        q_offset=causal_offset or 0,
        block_q=max(like.shape[1], 1) if fused else 128,  # the fused kernel tiles internally
        block_k=512,
        split_full=not fused,
    )
    return lo, hi, plan


def interval_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    plan: list[blockwise.Block],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, H, D], lse [B, H, Sq]) in fp32 (fp64 for fp64 inputs); no autograd.

    q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D]; lo, hi, plan from ``plan_intervals``.
    """
    B, Sq, H, D = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, Sq, H, D, dtype=cdt, device=q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=cdt, device=q.device)
    kern = _kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    blockwise.run_forward(kern, plan, lo, hi, out.transpose(1, 2), lse)
    return out, lse


def interval_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    plan: list[blockwise.Block],
    scale: float,
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> torch.Tensor:
    """Backward of one interval pass given the (possibly merged) out and lse; no autograd.

    Args:
        q, k, v, lo, hi, plan, scale: as in ``interval_forward``.
        dout: [B, Sq, H, D]; out: [B, Sq, H, D] and lse: [B, H, Sq] of the softmax the keys of
            this pass belong to (this pass alone, or the merge of all passes / blocks).
        dlse: [B, H, Sq] or None.
        dk, dv: fp32/fp64 accumulators [B, Sk, Hkv, D], added to in place (so several passes
            over the same keys share them).

    Returns:
        dq [B, Sq, H, D] in dk's dtype.
    """
    kern = _kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    kern.set_grads(dout.transpose(1, 2), out.transpose(1, 2), lse, dlse)
    dq = torch.zeros(q.shape, dtype=dk.dtype, device=q.device)
    blockwise.run_backward(
        kern, plan, lo, hi, dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    )
    return dq


class _IntervalAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lo, hi, plan, scale):
        out, lse = interval_forward(q, k, v, lo, hi, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lo, ctx.hi, ctx.plan, ctx.scale = lo, hi, plan, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None and not bool(dlse.ne(0).any()):
            dlse = None
        dk = torch.zeros(k.shape, dtype=out.dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=out.dtype, device=v.device)
        args = (ctx.lo, ctx.hi, ctx.plan, ctx.scale, dout, out, lse, dlse, dk, dv)
        dq = interval_backward(q, k, v, *args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def interval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    softmax_scale: float,
    causal_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in which query row r of batch row b sees keys [lo[b, r], hi[b, r]).

    Args:
        q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D] with H % Hkv == 0.
        lo, hi: int [Bp, Sq] (Bp = 1 or B) key index bounds; lo >= hi means no key.
        softmax_scale: logit multiplier.
        causal_offset: see ``plan_intervals`` (a planning hint only).

    Returns:
        out [B, Sq, H, D] and lse [B, H, Sq], both fp32 (fp64 for fp64 inputs): partial results
        meant to be merged; differentiable through both. Rows without keys: out 0, lse -inf.
    """
    lo, hi, plan = plan_intervals(lo, hi, like=q, causal_offset=causal_offset)
    return _IntervalAttnFunc.apply(q, k, v, lo, hi, plan, softmax_scale)
