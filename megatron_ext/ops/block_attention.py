"""Attention of queries at absolute positions against an arbitrary key block -> (out, lse).

The block function of context parallelism for plain, sliding-window, chunked-local and CoCA
attention: queries and keys each carry their per-document position and document id, so a query
shard can be attended against a key shard of any other region (another rank's zigzag slices, a
halo, a whole all-gathered sequence in rank order). Masks follow docs/methods/conventions.md on
*positions*, not on indices: key j is visible to query i when both are in the same document and

- causal: ``pos_j <= pos_i``; sliding window W: ``pos_i - W < pos_j <= pos_i``;
- chunked-local c: ``pos_j // c == pos_i // c`` and ``pos_j <= pos_i`` (per-document positions);
- non-causal: every key of the document.

A negative position marks a padding token (sharding pads odd or short documents): a padding key
is never visible and a padding query sees nothing (out 0, lse -inf).

Ordered by (document, position), the keys one query sees form one contiguous interval, so a block
is one call of the interval attention (``ops/intervals.py``, on the same blockwise engine
and tile kernels as ``attention_func``); keys given out of order are gathered into order first
(O(Sk), differentiable). Results are partials meant to be merged exactly
(``merge_attn_outputs``), hence fp32 (fp64 for fp64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import math

import torch

from megatron_ext.ops.intervals import interval_attention

__all__ = ["block_attention", "block_key_ranges"]


def _rows(x: torch.Tensor | None, name: str, s: int) -> torch.Tensor | None:
    """int tensor [S] / [Bp, S] -> CPU int64 [Bp, S]."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.dim() not in (1, 2):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}={got}; expected an integer tensor [{s}] or [B, {s}]")
    if x.shape[-1] != s:
        raise ValueError(f"{name}.shape={tuple(x.shape)}; expected last dim {s}")
    return x.detach().to("cpu", torch.int64).reshape(-1, s)


def _check_mask_args(causal: bool, window: int | None, chunk: int | None) -> None:
    for name, val in (("window", window), ("chunk", chunk)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"{name}={val!r}; expected None or an int >= 1")
    if not causal and (window is not None or chunk is not None):
        raise ValueError(
            f"causal=False with window={window}, chunk={chunk}; window and chunk masks are "
            "causal: pass causal=True"
        )


def _diagonal_hint(lo: torch.Tensor, hi: torch.Tensor, causal: bool) -> int | None:
    """Offset o with hi[0, r] == o + r + 1 at the first row that sees a key (planner hint)."""
    live = (hi[0] > lo[0]).nonzero()
    if not causal or live.numel() == 0:
        return None
    r = int(live[0, 0])
    offset = int(hi[0, r]) - 1 - r
    return offset if offset >= 0 else None


def block_key_ranges(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    q_doc_ids: torch.Tensor | None = None,
    k_doc_ids: torch.Tensor | None = None,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Visible key interval of every query once keys are ordered by (document, position).

    Args:
        q_positions: int [Sq] or [B, Sq] per-document query positions (negative = padding).
        k_positions: int [Sk] or [B, Sk] per-document key positions (negative = padding).
        q_doc_ids, k_doc_ids: optional int [Sq] / [B, Sq] and [Sk] / [B, Sk]; equal id = same
            document (any ints, need not be runs). Give both or neither (neither: one document).
        causal, window, chunk: mask rules of the module docstring.

    Returns:
        (order, lo, hi): ``order`` is None when the keys are already ordered, else int64
        [Bp, Sk] indices that order them (padding keys last in their document); lo, hi are CPU
        int64 [Bp, Sq] bounds into the ordered keys (lo == hi: no key). Bp = 1 when every input
        is shared by the batch, else B.
    """
    _check_mask_args(causal, window, chunk)
    qp = _rows(q_positions, "q_positions", q_positions.shape[-1])
    kp = _rows(k_positions, "k_positions", k_positions.shape[-1])
    if (q_doc_ids is None) != (k_doc_ids is None):
        raise ValueError("q_doc_ids and k_doc_ids: give both or neither")
    qd = _rows(q_doc_ids, "q_doc_ids", qp.shape[1])
    kd = _rows(k_doc_ids, "k_doc_ids", kp.shape[1])
    qd = torch.zeros_like(qp) if qd is None else qd
    kd = torch.zeros_like(kp) if kd is None else kd
    bp = max(x.shape[0] for x in (qp, kp, qd, kd))
    for name, x in (("q_positions", qp), ("k_positions", kp), ("q_doc_ids", qd), ("k_doc_ids", kd)):
        if x.shape[0] not in (1, bp):
            raise ValueError(f"{name} has {x.shape[0]} rows; expected 1 or B={bp}")
    qp, kp = qp.expand(bp, -1), kp.expand(bp, -1)
    qd, kd = qd.expand(bp, -1), kd.expand(bp, -1)
    # One sortable code per key: doc * mult + position, padding keys at the end of their doc.
    top = max([0, *(int(x.max()) for x in (qp, kp) if x.numel())])
    mult = top + 2
    k_code = kd * mult + torch.where(kp >= 0, kp, torch.full_like(kp, mult - 1))
    order = None
    if k_code.shape[1] > 1 and not bool((k_code[:, 1:] >= k_code[:, :-1]).all()):
        k_code, order = torch.sort(k_code, dim=1, stable=True)
    k_code = k_code.contiguous()
    first = torch.zeros_like(qp)
    if window is not None:
        first = torch.maximum(first, qp - window + 1)
    if chunk is not None:
        first = torch.maximum(first, qp - qp.remainder(chunk))
    last = qp + 1 if causal else torch.full_like(qp, mult - 1)  # exclusive, before padding
    base = qd * mult
    lo = torch.searchsorted(k_code, (base + first).contiguous())
    hi = torch.searchsorted(k_code, (base + last).contiguous())
    hi = torch.where(qp >= 0, torch.maximum(hi, lo), lo)  # padding queries see nothing
    return order, lo, hi


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    q_doc_ids: torch.Tensor | None = None,
    k_doc_ids: torch.Tensor | None = None,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of a query block against a key block at explicit positions.

    Splitting the keys of a problem into blocks, calling this on each and merging the results
    with ``merge_attn_outputs`` gives the whole result, values and gradients.

    Args:
        q: [B, Sq, H, D].
        k, v: [B, Sk, Hkv, D], H % Hkv == 0 (query head h reads KV head h // (H // Hkv)).
        q_positions: int [Sq] or [B, Sq] per-document positions of the queries (< 0: padding).
        k_positions: int [Sk] or [B, Sk] per-document positions of the keys (< 0: padding).
        q_doc_ids, k_doc_ids: optional int [Sq] / [B, Sq] and [Sk] / [B, Sk] document ids,
            equal id = same document; both or neither.
        causal: keys at positions <= the query's.
        window: sliding window W (``pos_i - W < pos_j <= pos_i``); needs causal.
        chunk: chunked-local size c (same ``pos // c``); needs causal.
        softmax_scale: default 1/sqrt(D).

    Returns:
        out [B, Sq, H, D] and lse [B, H, Sq], both fp32 (fp64 for fp64 inputs); rows with no
        visible key give out 0 and lse -inf. Differentiable w.r.t. q, k, v through both outputs.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}={got}; expected a float tensor [B, S, heads, D]")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}; "
            "expected q [B, Sq, H, D] and k, v [B, Sk, Hkv, D]"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}; expected all equal")
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"H={H}, Hkv={Hkv}; expected H % Hkv == 0 (GQA groups)")
    for name, pos, s in (("q_positions", q_positions, Sq), ("k_positions", k_positions, Sk)):
        rows = _rows(pos, name, s)
        if rows.shape[0] not in (1, B):
            raise ValueError(f"{name}.shape={tuple(pos.shape)}; expected [{s}] or [{B}, {s}]")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not math.isfinite(float(softmax_scale)):
        raise ValueError(f"softmax_scale={softmax_scale!r}; expected a finite float or None")
    else:
        scale = float(softmax_scale)
    order, lo, hi = block_key_ranges(
        q_positions, k_positions, q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids, causal=causal,
        window=window, chunk=chunk,
    )  # fmt: skip
    if order is not None:  # gather keys into (document, position) order
        idx = order.to(k.device)[:, :, None, None].expand(B, Sk, Hkv, D)
        k, v = k.gather(1, idx), v.gather(1, idx)
    if window is None:
        return interval_attention(
            q, k, v, lo, hi, softmax_scale=scale, causal_offset=_diagonal_hint(lo, hi, causal)
        )
    # A sliding window gives every row a different interval without a jump, so the planner
    # would treat all rows as one block and visit O(Sq * Sk) keys; blocks of about the window
    # height keep the cost at O(Sq * W), as in attention_func.
    bq = min(256, max(window, 64))
    parts = [
        interval_attention(
            q[:, r0 : r0 + bq],
            k,
            v,
            lo[:, r0 : r0 + bq],
            hi[:, r0 : r0 + bq],
            softmax_scale=scale,
            causal_offset=_diagonal_hint(lo[:, r0 : r0 + bq], hi[:, r0 : r0 + bq], causal),
        )  # fmt: skip
        for r0 in range(0, Sq, bq)
    ]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 2)
