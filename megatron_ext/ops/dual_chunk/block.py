"""Dual Chunk Attention of arbitrary queries against an arbitrary key block -> (out, lse).

The pass decomposition of README.md ("Passes") on absolute per-document positions, so the
same function serves the single-process op (all keys at once) and context parallelism (one call
per (Q block, KV block) pair, results merged exactly). With the keys ordered by (document,
position), each pass gives every query row one contiguous key interval (``dca_key_ranges``), so
each pass is *one* call of the interval attention in ``intervals.py`` over all query rows,
whatever the number of chunks; the three partial results meet in ``merge_attn_outputs``. The
backward differentiates each pass against the merged (out, lse), which is exact (no weight is
ever treated as a constant). Nothing of size Sq x Sk is built.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.dual_chunk.positions import (
    check_chunk_args,
    check_qkv,
    dca_chunk_len,
    dca_query_positions,
)
from megatron_ext.ops.dual_chunk.rotary import rope_tables, rotate, rotate_by_tables
from megatron_ext.ops.intervals import (
    backward_inputs,
    interval_backward,
    interval_forward,
    plan_intervals,
)
from megatron_ext.ops.merge import merge_attn_outputs
from megatron_ext.ops.rope import RopeScaling

__all__ = ["dca_key_ranges", "dca_rotate_keys", "dca_rotate_queries", "dual_chunk_block"]


def dca_rotate_keys(
    k: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    seq_len: int | None = None,
    rotary_dim: int | None = None,
) -> torch.Tensor:
    """K' = R_{j mod C} k: the only key rotation DCA needs (and what a KV cache stores).

    Args:
        k: un-rotated keys [B, Sk, Hkv, D].
        k_positions: int [Sk] or [B, Sk], per-document key positions j.
        chunk_size: M. local_size: W (C = M - W).
        theta: RoPE base.
        scaling, seq_len: RoPE frequency scaling and the dynamic-NTK length L.
        rotary_dim: rotated dims per head (partial rotary; the rest is position-free).

    Returns:
        [B, Sk, Hkv, D] in k's dtype.
    """
    check_chunk_args(chunk_size, local_size)
    pos = k_positions.long() % (chunk_size - local_size)
    return rotate(k, pos, theta=theta, scaling=scaling, seq_len=seq_len, rotary_dim=rotary_dim)


def dca_rotate_queries(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    seq_len: int | None = None,
    rotary_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three differentiable query copies (intra, successive, inter).

    Args:
        q: un-rotated queries [B, Sq, H, D].
        q_positions: int [Sq] or [B, Sq], per-document query positions i.

    Returns:
        (R_{i mod C} q, R_{min(C + i mod C, M)} q, R_{P_inter} q), each [B, Sq, H, D].
    """
    pos = dca_query_positions(q_positions, chunk_size=chunk_size, local_size=local_size)
    rope = {"theta": theta, "scaling": scaling, "seq_len": seq_len, "rotary_dim": rotary_dim}
    return tuple(rotate(q, p, **rope) for p in pos)  # type: ignore[return-value]


def dca_key_ranges(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    q_doc_ids: torch.Tensor | None = None,
    k_doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Key index intervals of the intra, successive and inter passes for every query row.

    Keys are ordered by (document, position); in that order the keys a query sees in one pass
    are contiguous: its own chunk up to itself (intra), the previous chunk (successive), the
    document prefix before that (inter).

    Args:
        q_positions: int [Sq] or [B, Sq]; k_positions: int [Sk] or [B, Sk] (per document;
            negative = a padding token: a padding key is never visible, a padding query sees
            nothing).
        chunk_size, local_size: M and W (C = M - W).
        q_doc_ids, k_doc_ids: optional int [Sq] / [B, Sq] and [Sk] / [B, Sk] document ids
            (equal id = same document), both or neither.

    Returns:
        (order, [(lo, hi)] * 3): ``order`` is None when the keys are already sorted by
        (document, position), else an int64 [Bp, Sk] permutation that sorts them; each pass
        gives CPU int64 [Bp, Sq] bounds into the sorted keys (lo >= hi: no key). Bp = 1 when
        all inputs are shared by the batch, else B.
    """
    c = dca_chunk_len(chunk_size, local_size)
    rows = [
        None if x is None else x.detach().to("cpu", torch.int64).reshape(-1, x.shape[-1])
        for x in (q_positions, k_positions, q_doc_ids, k_doc_ids)
    ]
    bp = max(x.shape[0] for x in rows if x is not None)
    qp, kp, qd, kd = (None if x is None else x.expand(bp, -1) for x in rows)
    # One sortable code per (document, position); padding keys sort last in their document,
    # after every position a query interval can reach (positions + 1 < mult - 1).
    mult = max([0, *(int(x.max()) for x in (qp, kp) if x.numel())]) + 3
    k_code = torch.where(kp >= 0, kp, torch.full_like(kp, mult - 1))
    q_base = torch.zeros_like(qp)
    if kd is not None:
        k_code, q_base = k_code + kd * mult, qd * mult
    order = None
    if k_code.shape[1] > 1 and not bool((k_code[:, 1:] >= k_code[:, :-1]).all()):
        k_code, order = torch.sort(k_code, dim=1, stable=True)
    k_code = k_code.contiguous()

    def find(pos: torch.Tensor) -> torch.Tensor:  # first key index with code >= (doc, pos)
        return torch.searchsorted(k_code, (q_base + pos.clamp(min=0)).contiguous())

    n = qp.clamp(min=0) // c
    ranges = []
    for first, last, min_n in (  # positions [first, last) for chunk index n >= min_n
        (n * c, qp + 1, 0),  # intra: own chunk up to the query
        ((n - 1) * c, n * c, 1),  # successive: the previous chunk
        (0 * n, (n - 1) * c, 2),  # inter: all older chunks
    ):
        lo, hi = find(first), find(last)
        ranges.append((lo, torch.where((n >= min_n) & (qp >= 0), hi, lo)))  # padding: none
    return order, ranges


def _diagonal_hint(lo: torch.Tensor, hi: torch.Tensor) -> int | None:
    """Offset o with hi[0, r] == o + r + 1 at the first row that sees a key (a planner hint)."""
    live = (hi[0] > lo[0]).nonzero()
    if live.numel() == 0:
        return None
    r = int(live[0, 0])
    offset = int(hi[0, r]) - 1 - r
    return offset if offset >= 0 else None


class _DualChunkPassesFunc(torch.autograd.Function):
    """The three passes and their exact merge, with a ring-style backward.

    Forward: for each pass, q is rotated to that pass's positions and the pass gives fp32
    (out_k, lse_k); the parts are merged by ``merge_attn_outputs``. Backward: every pass is
    differentiated against the *merged* (out, lse) and the incoming (dout, dlse) (form 2 of
    "Backward of the merge" in docs/methods/conventions.md), so its probabilities are the global
    ones and ``D = rowsum(dout * out) - dlse`` is shared; nothing is treated as a constant. dK and
    dV of the passes accumulate in one buffer each; each pass's dq is rotated back (R^T) into one
    dq. The rotated query copies are recomputed in backward rather than saved, so saved memory is
    that of one attention.
    """

    @staticmethod
    def forward(ctx, q, k_rot, v, passes, tables, scale):
        B, Sq, H, D = q.shape
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        parts = []
        for i, lo, hi, plan in passes:
            q_rot = rotate_by_tables(q, *tables[i]).to(q.dtype)  # fp32 maths, q's dtype out
            parts.append(interval_forward(q_rot, k_rot, v, lo, hi, plan, scale))
            del q_rot
        if not parts:
            out = torch.zeros(B, Sq, H, D, dtype=cdt, device=q.device)
            lse = torch.full((B, H, Sq), float("-inf"), dtype=cdt, device=q.device)
        elif len(parts) == 1:
            out, lse = parts[0]
        else:
            out, lse = merge_attn_outputs([p[0] for p in parts], [p[1] for p in parts])
        ctx.save_for_backward(q, k_rot, v, out, lse)
        ctx.passes, ctx.tables, ctx.scale = passes, tables, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k_rot, v, out, lse = ctx.saved_tensors
        dout, dlse = backward_inputs(out, dout, dlse)
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)
        dk = torch.zeros(k_rot.shape, dtype=out.dtype, device=k_rot.device)
        dv = torch.zeros(v.shape, dtype=out.dtype, device=v.device)
        for i, lo, hi, plan in ctx.passes:
            cos, sin = ctx.tables[i]
            q_rot = rotate_by_tables(q, cos, sin).to(q.dtype)
            args = (lo, hi, plan, ctx.scale, dout, out, lse, dlse, dk, dv)
            dq_rot = interval_backward(q_rot, k_rot, v, *args)
            dq += rotate_by_tables(dq_rot, cos.to(dq.dtype), sin.to(dq.dtype), inverse=True)
        return dq.to(q.dtype), dk.to(k_rot.dtype), dv.to(v.dtype), None, None, None


def dual_chunk_block(
    q: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    *,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    chunk_size: int,
    local_size: int,
    theta: float = 10000.0,
    softmax_scale: float | None = None,
    q_doc_ids: torch.Tensor | None = None,
    k_doc_ids: torch.Tensor | None = None,
    temperature: float | torch.Tensor | None = None,
    scaling: RopeScaling | None = None,
    seq_len: int | None = None,
    rotary_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DCA contribution of one key block to a set of queries, as a mergeable (out, lse).

    Key j is visible to query i when both are in the same document and j <= i (per-document
    positions); the query rotation follows the intra / successive / inter rule. Splitting the
    keys into blocks, calling this on each and merging with ``merge_attn_outputs`` gives the
    full result, values and gradients.

    Args:
        q: UN-ROTATED queries [B, Sq, H, D].
        k_rot: keys already rotated by ``dca_rotate_keys`` (R_{j mod C} k) [B, Sk, Hkv, D].
        v: values [B, Sk, Hkv, D].
        q_positions: int [Sq] (shared by the batch) or [B, Sq], per-document positions;
            negative marks a padding query (it sees nothing: out 0, lse -inf).
        k_positions: int [Sk] or [B, Sk], per-document positions; negative marks a padding key
            (never visible). Keys may come in any order.
        chunk_size: M, the largest position index used. local_size: W; C = M - W.
        theta: RoPE base.
        softmax_scale: default 1/sqrt(D).
        q_doc_ids: optional int [Sq] / [B, Sq] document ids; k_doc_ids: int [Sk] / [B, Sk].
            Equal id = same document. Give both or neither (neither = one document).
        temperature: T (float, or a tensor [Sq] / [B, Sq] per query); logits are scaled by T².
        scaling, seq_len: RoPE frequency scaling and the dynamic-NTK length L (must match the
            key rotation's).
        rotary_dim: rotated dims per head (partial rotary; must match the key rotation's).

    Returns:
        out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] (fp32; fp64 for fp64 inputs). Queries
        with no visible key in the block get out = 0 and lse = -inf.
    """
    check_qkv(q, k_rot, v)
    check_chunk_args(chunk_size, local_size)
    B, Sq, _, D = q.shape
    Sk = k_rot.shape[1]
    if (q_doc_ids is None) != (k_doc_ids is None):
        raise ValueError("q_doc_ids and k_doc_ids: give both or neither")
    for name, pos, s in (("q_positions", q_positions, Sq), ("k_positions", k_positions, Sk)):
        if pos.dtype.is_floating_point or pos.shape not in ((s,), (B, s)):
            raise ValueError(
                f"{name} shape={tuple(pos.shape)} dtype={pos.dtype}; expected an int tensor "
                f"[{s}] or [{B}, {s}]"
            )
    for name, ids, s in (("q_doc_ids", q_doc_ids, Sq), ("k_doc_ids", k_doc_ids, Sk)):
        if ids is not None and (ids.dtype.is_floating_point or ids.shape not in ((s,), (B, s))):
            raise ValueError(
                f"{name} shape={tuple(ids.shape)} dtype={ids.dtype}; expected int [{s}] or "
                f"[{B}, {s}]"
            )
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    if not scale > 0:
        raise ValueError(f"softmax_scale={softmax_scale!r}; expected > 0")
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    if isinstance(temperature, torch.Tensor) and temperature.shape not in ((Sq,), (B, Sq)):
        raise ValueError(
            f"temperature shape={tuple(temperature.shape)}; expected a float, [{Sq}] or [{B}, {Sq}]"
        )
    if isinstance(temperature, torch.Tensor) and temperature.numel() > 0:
        t2 = temperature.to(torch.float64) ** 2
        if bool((t2 == t2.flatten()[0]).all()):  # one value: keep it in the softmax scale
            scale *= float(t2.flatten()[0])
        else:  # per-query temperatures (documents of different lengths): fold into q
            q = q * t2.expand(B, Sq)[:, :, None, None].to(q.device, q.dtype)  # rotations are linear
    elif temperature is not None and not isinstance(temperature, torch.Tensor):
        scale *= float(temperature) ** 2
    pos = dca_query_positions(q_positions, chunk_size=chunk_size, local_size=local_size)
    rope = {"theta": theta, "scaling": scaling, "seq_len": seq_len, "rotary_dim": rotary_dim}
    tables = [rope_tables(q, p, **rope) for p in pos]

    order, ranges = dca_key_ranges(
        q_positions,
        k_positions,
        chunk_size=chunk_size,
        local_size=local_size,
        q_doc_ids=q_doc_ids,
        k_doc_ids=k_doc_ids,
    )
    if order is not None:  # gather keys into (document, position) order; O(S), differentiable
        idx = order.to(k_rot.device)[:, :, None, None].expand(B, Sk, *k_rot.shape[2:])
        k_rot, v = k_rot.gather(1, idx), v.gather(1, idx)
    passes = []  # (which query copy, lo, hi, plan) for passes that see at least one key
    for which, (lo, hi) in enumerate(ranges):
        if bool((hi > lo).any()):
            hint = _diagonal_hint(lo, hi) if which == 0 else None  # intra: causal diagonal
            plan = plan_intervals(lo, hi, like=q, keys=Sk, causal_offset=hint)
            passes.append((which, *plan))
    out, lse = _DualChunkPassesFunc.apply(q, k_rot, v, passes, tables, scale)
    return out.to(q.dtype), lse.to(lse_dtype)
