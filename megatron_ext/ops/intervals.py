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
  form 2 of docs/methods/conventions.md, "Backward of the merge"): then ``P = exp(z - lse)`` is
  already the global probability and ``D_i = rowsum(dO * O) - dlse_i``, and the gradients of all
  parts are exact.
- ``interval_attention``: one pass as a differentiable (out, lse), exact also for a gradient
  flowing into lse (form 1, for merging by autograd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ext.ops import blockwise
from megatron_ext.ops.backend import forced_backend, resolve_backend
from megatron_ext.ops.cpu_flash import FusedCPUTiles, fused_cpu_available
from megatron_ext.ops.sdpa_tiles import SDPATiles, sdpa_engine
from megatron_ext.ops.triton import HEAD_DIMS, triton_attention_supported
from megatron_ext.ops.triton import intervals as triton_intervals

__all__ = [
    "TilePlan", "backward_inputs", "interval_attention", "interval_backward", "interval_forward",
    "plan_intervals",
]


def _tiles(x: torch.Tensor) -> str:
    """Tile kernel for queries like x, as ``backend`` resolves it: "cpu" (fused ATen CPU
    kernel), "torch" (plain torch tiles, any device), "sdpa" (PyTorch's fused kernels with their
    lse, ``sdpa_tiles.py``) or "triton" (the Triton kernels)."""
    name = resolve_backend(x, "intervals")
    if name == "sdpa":
        if x.device.type == "cuda" and x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"backend 'sdpa' needs fp16 / bf16 on CUDA (got {x.dtype})")
        if x.device.type == "cpu" and not fused_cpu_available():
            raise ValueError("backend 'sdpa' on CPU needs torch's fused CPU kernel")
        return "sdpa"
    if name in ("cpu_fused", "cpu_blockwise"):
        if x.device.type != "cpu" or not fused_cpu_available():
            raise ValueError(f"backend {name!r} needs CPU tensors and torch's fused CPU kernel")
        return "cpu"
    if name == "triton":
        return "triton"
    if name != "torch_blockwise":
        raise ValueError(
            f"backend {name!r} has no kernel for per-row key intervals (CP blocks, DCA passes); "
            "use 'triton', 'sdpa', 'torch_blockwise' or 'cpu_blockwise'"
        )
    return "torch"


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, plan: TilePlan):
    """The plan's tile kernel ("cpu", "sdpa", "torch") for [B, H, S, D] views."""
    if plan.kernel == "cpu":  # fp32 maths for half inputs: partial results get merged afterwards
        return FusedCPUTiles(q, k, v, scale, upcast=True)
    if plan.kernel == "sdpa":
        return SDPATiles(q, k, v, scale, engine=plan.engine)
    return blockwise.TorchTiles(q, k, v, scale)


@dataclass(frozen=True)
class TilePlan:
    """Query blocks and key pieces for the torch, fused CPU or SDPA tile kernels."""

    blocks: list[blockwise.Block]
    kernel: str
    """"cpu" (fused ATen CPU tiles), "sdpa" (``sdpa_tiles.SDPATiles``) or "torch"."""
    engine: str | None = None
    """The SDPA engine (``sdpa_tiles.sdpa_engine``), fixed when planned so the backward uses
    the forward's."""


Plan = TilePlan | triton_intervals.TritonIntervals


def plan_intervals(
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    like: torch.Tensor,
    keys: int,
    causal_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """Normalise the bounds and plan the pass for the backend ``backend`` picks.

    Args:
        lo, hi: int [Bp, Sq] (Bp = 1 or B) key index bounds; lo >= hi means no key.
        like: a query tensor [B, Sq, H, D] (its device and dtype pick the kernel).
        keys: Sk, the number of keys.
        causal_offset: optional hint that ``hi[:, r] == causal_offset + r + 1`` on many rows,
            so the planner can use the causal diagonal tile there. Only a hint: the bounds
            alone decide what is visible.

    Returns:
        (lo, hi, plan) with lo, hi CPU int64 and hi >= lo; plan is a ``TilePlan`` (query blocks
        and key pieces for the torch / fused CPU tiles) or the Triton kernels' device bounds.
        Triton needs the bounds non-decreasing over the rows (queries in (document, position)
        order) and Sq <= Sk; otherwise the torch tiles run, or, when Triton was forced, a
        ValueError says why.
    """
    lo, hi = lo.to("cpu", torch.int64).contiguous(), hi.to("cpu", torch.int64).contiguous()
    hi = torch.maximum(hi, lo)
    tiles = _tiles(like)
    if tiles == "triton":
        if not triton_attention_supported(like):
            raise ValueError(
                f"backend 'triton' cannot take these inputs (D={like.shape[-1]}, dtype="
                f"{like.dtype}, device={like.device}): head dims {HEAD_DIMS} on CUDA, or CPU "
                "tensors under the Triton interpreter"
            )
        p = triton_intervals.plan(lo, hi, batch=like.shape[0], sk=keys, device=like.device)
        if p is not None:
            return lo, hi, p
        if forced_backend() == "triton":
            raise ValueError(
                "backend 'triton' needs per-row key intervals whose bounds do not decrease over "
                f"the rows (queries in (document, position) order) and Sq <= Sk "
                f"(Sq={lo.shape[1]}, Sk={keys}); use 'torch_blockwise' for this call"
            )
        tiles = "torch"
    fused = tiles in ("cpu", "sdpa")  # kernels that tile internally take whole row blocks
    blocks = blockwise.plan_blocks(
        lo,
        hi,
        causal=causal_offset is not None,
        q_offset=causal_offset or 0,
        block_q=max(like.shape[1], 1) if fused else 128,  # the fused kernel tiles internally
        block_k=512,
        split_full=not fused,
    )
    engine = sdpa_engine(like.device) if tiles == "sdpa" else None
    return lo, hi, TilePlan(blocks, tiles, engine)


def interval_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    plan: Plan,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, H, D], lse [B, H, Sq]) in fp32 (fp64 for fp64 inputs); no autograd.

    q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D]; lo, hi, plan from ``plan_intervals``.
    """
    if isinstance(plan, triton_intervals.TritonIntervals):
        return triton_intervals.interval_forward(q, k, v, plan, scale)
    B, Sq, H, D = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, Sq, H, D, dtype=cdt, device=q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=cdt, device=q.device)
    kern = _kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, plan)
    blockwise.run_forward(kern, plan.blocks, lo, hi, out.transpose(1, 2), lse)
    return out, lse


def interval_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    plan: Plan,
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
    if isinstance(plan, triton_intervals.TritonIntervals):
        dq, gk, gv = triton_intervals.interval_backward(
            q, k, v, plan, scale, dout, out, lse, dlse
        )
        dk += gk.to(dk.dtype)
        dv += gv.to(dv.dtype)
        return dq.to(dk.dtype)
    kern = _kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, plan)
    kern.set_grads(dout.transpose(1, 2), out.transpose(1, 2), lse, dlse)
    dq = torch.zeros(q.shape, dtype=dk.dtype, device=q.device)
    blockwise.run_backward(
        kern, plan.blocks, lo, hi, dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    )
    return dq


def backward_inputs(
    out: torch.Tensor, dout: torch.Tensor | None, dlse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (dout, dlse) a backward of (out, lse) works with: a missing dout is zeros; a dlse
    that is all zeros (lse unused downstream, the common case) is dropped so no extra D term is
    computed. That test reads the values, so it is only made for CPU tensors: on a GPU it would
    stall the stream, and a zero dlse costs one subtraction there."""
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is not None and dlse.device.type == "cpu" and not bool(dlse.ne(0).any()):
        dlse = None
    return dout, dlse


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
        dout, dlse = backward_inputs(out, dout, dlse)
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
    lo, hi, plan = plan_intervals(lo, hi, like=q, keys=k.shape[1], causal_offset=causal_offset)
    return _IntervalAttnFunc.apply(q, k, v, lo, hi, plan, softmax_scale)
