"""Per-row key intervals on the Triton attention kernels (CP blocks and DCA passes on a GPU).

The interval engine (``ops/intervals.py``) gives query row r the keys ``[lo_r, hi_r)``. The
Triton kernels already take per-token bounds in their document mode: the forward and dq kernels
read, for query row r, the keys it sees, and the dk/dv kernel reads, for key j, the query rows
that see it. For documents both are the document's bounds; for general intervals they are two
different arrays, which is all this module adds (``attention_bwd(col_docs=...)``).

The rows that see key j form one contiguous range when lo and hi are non-decreasing over the
rows, which holds when the queries are ordered by (document, position), as every context-
parallel shard and every DCA pass is: then ``rows(j) = [#{r: hi_r <= j}, #{r: lo_r <= j})``. Rows
that see nothing get the empty interval ``[m, m)`` with m the largest hi so far, which keeps
both bounds non-decreasing wherever that is possible at all. ``plan`` returns None when the
bounds are not monotone (or there are more query rows than keys); the caller then uses the
torch tiles, or raises when Triton was forced.

Partial results are written in fp32 (fp64 for fp64 inputs) so that merging them is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ext.ops.triton.attention_bwd import attention_bwd
from megatron_ext.ops.triton.attention_fwd import attention_fwd
from megatron_ext.ops.triton.interface import _check_kernel_inputs, _config

__all__ = ["TritonIntervals", "plan", "interval_backward", "interval_forward"]


@dataclass(frozen=True)
class TritonIntervals:
    """Device bounds for the kernels: int32 [B, Sk] each (row bounds use the first Sq slots)."""

    rows: tuple[torch.Tensor, torch.Tensor]
    """lo, hi of every query row: the keys it sees."""
    cols: tuple[torch.Tensor, torch.Tensor]
    """First and end query row that see each key."""


def plan(
    lo: torch.Tensor, hi: torch.Tensor, *, batch: int, sk: int, device: torch.device
) -> TritonIntervals | None:
    """Kernel bounds for CPU int64 [Bp, Sq] intervals (hi >= lo), or None when unsupported."""
    bp, sq = lo.shape
    if sq > sk or sq == 0 or sk == 0:
        return None
    empty = hi <= lo
    seen = torch.where(empty, torch.zeros_like(hi), hi).cummax(dim=1).values
    lo2, hi2 = torch.where(empty, seen, lo), torch.where(empty, seen, hi)
    if sq > 1 and not (bool((lo2[:, 1:] >= lo2[:, :-1]).all())
                       and bool((hi2[:, 1:] >= hi2[:, :-1]).all())):
        return None
    j = torch.arange(sk, dtype=torch.int64).expand(bp, sk).contiguous()
    first = torch.searchsorted(hi2.contiguous(), j, right=True)  # rows with hi <= j come before
    end = torch.maximum(torch.searchsorted(lo2.contiguous(), j, right=True), first)
    pad = torch.zeros(bp, sk - sq, dtype=torch.int64)

    def dev(x: torch.Tensor) -> torch.Tensor:
        return x.expand(batch, -1).to(device=device, dtype=torch.int32).contiguous()

    rows = (dev(torch.cat((lo2, pad), 1)), dev(torch.cat((hi2, pad), 1)))
    return TritonIntervals(rows, (dev(first), dev(end)))


def _opts(p: TritonIntervals, scale: float) -> dict:
    return {"scale": scale, "q_offset": 0, "mode": 0, "causal": False, "window": None,
            "chunk_len": 1, "docs": p.rows}


def interval_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: TritonIntervals, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, H, D], lse [B, H, Sq]), both fp32 (fp64 for fp64 inputs); no autograd."""
    _check_kernel_inputs(q)
    qs = q.contiguous().unsqueeze(0)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return attention_fwd(qs, k.contiguous(), v.contiguous(), **_opts(p, scale),
                         config=_config(qs), out_dtype=acc)


def interval_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: TritonIntervals,
    scale: float,
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one interval pass given the (possibly merged) out and lse.

    For 16-bit inputs dout and out enter the kernels in the input dtype (the kernels' dot
    products take one operand type); D = rowsum(dout * out) - dlse is still summed in fp32.
    """
    qs = q.contiguous().unsqueeze(0)
    dout, out = dout.to(q.dtype), out.to(q.dtype)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    dqs, dk, dv = attention_bwd(
        qs, k.contiguous(), v.contiguous(), out.contiguous(), lse, dout.contiguous(),
        None if dlse is None else dlse.to(lse.dtype).contiguous(), **_opts(p, scale),
        config=_config(qs), col_docs=p.cols,
    )  # fmt: skip
    return dqs[0], dk, dv
