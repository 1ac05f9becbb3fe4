"""Dual Chunk Attention of arbitrary queries against an arbitrary key block -> (out, lse).

The pass decomposition of ../shared/METHODS.md §5 expressed on absolute per-document positions,
so that the same function serves the single-process op (all keys at once) and context
parallelism (one call per (Q block, KV block) pair, results merged exactly). Queries are cut
into runs that are contiguous and inside one DCA chunk; keys into contiguous runs. Each query
run needs at most one intra (causal), one successive and one inter (both unmasked) attention
call; their partial results meet in ``merge_attn_outputs``, whose weights are never detached, so
gradients are exact. Nothing of size Sq x Sk is built.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.attention import attention_func
from megatron_ext.ops.dual_chunk.positions import (
    check_chunk_args,
    check_qkv,
    dca_query_positions,
)
from megatron_ext.ops.merge import merge_attn_outputs
from megatron_ext.ops.rope import apply_rope

__all__ = ["dca_rotate_keys", "dca_rotate_queries", "dual_chunk_block"]


def dca_rotate_keys(
    k: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    theta: float = 10000.0,
) -> torch.Tensor:
    """K' = R_{j mod C} k: the only key rotation DCA needs (and what a KV cache stores).

    Args:
        k: un-rotated keys [B, Sk, Hkv, D].
        k_positions: int [Sk] or [B, Sk], per-document key positions j.
        chunk_size: M. local_size: W (C = M - W).
        theta: RoPE base.

    Returns:
        [B, Sk, Hkv, D] in k's dtype.
    """
    check_chunk_args(chunk_size, local_size)
    return apply_rope(k, k_positions.long() % (chunk_size - local_size), theta=theta)


def dca_rotate_queries(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three differentiable query copies (intra, successive, inter).

    Args:
        q: un-rotated queries [B, Sq, H, D].
        q_positions: int [Sq] or [B, Sq], per-document query positions i.

    Returns:
        (R_{i mod C} q, R_{min(C + i mod C, M)} q, R_{P_inter} q), each [B, Sq, H, D].
    """
    pos = dca_query_positions(q_positions, chunk_size=chunk_size, local_size=local_size)
    return tuple(apply_rope(q, p, theta=theta) for p in pos)  # type: ignore[return-value]


def _runs(pos: torch.Tensor, doc: torch.Tensor | None, chunk: int | None) -> list[tuple]:
    """Maximal runs (start, end, first position, doc) of consecutive positions in one doc.

    With ``chunk`` a run also never crosses a multiple of ``chunk``. pos, doc: 1-D int tensors.
    """
    n = pos.numel()
    if n == 0:
        return []
    brk = torch.ones(n, dtype=torch.bool, device=pos.device)
    brk[1:] = pos[1:] != pos[:-1] + 1
    if chunk is not None:
        brk[1:] |= (pos[1:] // chunk) != (pos[:-1] // chunk)
    if doc is not None:
        brk[1:] |= doc[1:] != doc[:-1]
    starts = torch.nonzero(brk).flatten()
    first_pos = pos[starts].tolist()
    docs = doc[starts].tolist() if doc is not None else [0] * len(first_pos)
    starts = starts.tolist()
    ends = starts[1:] + [n]
    return list(zip(starts, ends, first_pos, docs))


def _cat_keys(x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    if len(spans) == 1:
        return x[:, spans[0][0] : spans[0][1]]
    return torch.cat([x[:, a:b] for a, b in spans], dim=1)


def _empty_result(q: torch.Tensor, rows: int, lse_dtype: torch.dtype) -> tuple:
    B, _, H, D = q.shape
    out = torch.zeros(B, rows, H, D, dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, rows), float("-inf"), dtype=lse_dtype, device=q.device)
    return out, lse


def _block_one_layout(
    qs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    k_rot: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_doc: torch.Tensor | None,
    k_doc: torch.Tensor | None,
    c: int,
    scale: float,
    lse_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All batch rows of qs / k_rot / v share these 1-D positions and docs."""
    q_intra, q_succ, q_inter = qs
    key_runs: dict[int, list[tuple]] = {}
    for run in _runs(k_pos, k_doc, None):
        key_runs.setdefault(run[3], []).append(run)

    outs, lses = [], []
    for r0, r1, p0, doc in _runs(q_pos, q_doc, c):
        n, p_end = p0 // c, p0 + (r1 - r0)  # chunk index; one past the last query position
        parts = []  # (first row inside the run, out, lse) over consecutive rows
        succ_spans, inter_spans = [], []
        for c0, c1, kp0, _ in key_runs.get(doc, []):
            kp1 = kp0 + (c1 - c0)
            # intra: keys of chunk n up to the last query, causal on positions.
            lo, hi = max(kp0, n * c), min(kp1, p_end)
            if lo < hi:
                ks = slice(c0 + lo - kp0, c0 + hi - kp0)
                skip = max(0, lo - p0)  # leading queries that precede every key of the span
                last = hi - p0  # queries from here on follow every key of the span
                if skip < last:  # rows with a position in [lo, hi): causal, bottom-right
                    o, s = attention_func(
                        q_intra[:, r0 + skip : r0 + last],
                        k_rot[:, ks],
                        v[:, ks],
                        causal=True,
                        softmax_scale=scale,
                        q_offset=p0 + skip - lo,
                    )
                    parts.append((skip, o, s))
                if r0 + last < r1:  # the key span ends before these rows: no mask
                    o, s = attention_func(
                        q_intra[:, r0 + last : r1],
                        k_rot[:, ks],
                        v[:, ks],
                        causal=False,
                        softmax_scale=scale,
                    )
                    parts.append((last, o, s))
            lo, hi = max(kp0, (n - 1) * c), min(kp1, n * c)
            if n >= 1 and lo < hi:
                succ_spans.append((c0 + lo - kp0, c0 + hi - kp0))
            hi = min(kp1, (n - 1) * c)
            if n >= 2 and kp0 < hi:
                inter_spans.append((c0, c0 + hi - kp0))
        for qx, spans in ((q_succ, succ_spans), (q_inter, inter_spans)):
            if spans:  # every key here is in an older chunk: visible to all rows, no mask
                o, s = attention_func(
                    qx[:, r0:r1],
                    _cat_keys(k_rot, spans),
                    _cat_keys(v, spans),
                    causal=False,
                    softmax_scale=scale,
                )
                parts.append((0, o, s))
        outs_r, lses_r = [], []
        for first, o, s in parts:  # pad partial-row parts to the whole run: 0 / -inf rows
            after = (r1 - r0) - first - o.shape[1]
            if first or after:
                pad_a, pad_sa = _empty_result(o, first, s.dtype)
                pad_b, pad_sb = _empty_result(o, after, s.dtype)
                o, s = torch.cat((pad_a, o, pad_b), dim=1), torch.cat((pad_sa, s, pad_sb), dim=2)
            outs_r.append(o)
            lses_r.append(s)
        if not parts:
            o, s = _empty_result(q_intra, r1 - r0, lse_dtype)
        elif len(parts) == 1:
            o, s = outs_r[0], lses_r[0]
        else:
            o, s = merge_attn_outputs(outs_r, lses_r)
        outs.append(o.to(q_intra.dtype))
        lses.append(s.to(lse_dtype))
    if not outs:
        return _empty_result(q_intra, 0, lse_dtype)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


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
        q_positions: int [Sq] (shared by the batch) or [B, Sq], per-document positions.
        k_positions: int [Sk] or [B, Sk], per-document positions.
        chunk_size: M, the largest position index used. local_size: W; C = M - W.
        theta: RoPE base.
        softmax_scale: default 1/sqrt(D).
        q_doc_ids: optional int [B, Sq] document ids; k_doc_ids: int [B, Sk]. Give both or
            neither (neither = one document).
        temperature: T (float, or a tensor [Sq] / [B, Sq] per query); logits are scaled by T².

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
        if ids is not None and (ids.dtype.is_floating_point or ids.shape != (B, s)):
            raise ValueError(
                f"{name} shape={tuple(ids.shape)} dtype={ids.dtype}; expected int [{B}, {s}]"
            )
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    if not scale > 0:
        raise ValueError(f"softmax_scale={softmax_scale!r}; expected > 0")
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = chunk_size - local_size

    qs = dca_rotate_queries(
        q, q_positions, chunk_size=chunk_size, local_size=local_size, theta=theta
    )
    if isinstance(temperature, torch.Tensor) and temperature.shape not in ((Sq,), (B, Sq)):
        raise ValueError(
            f"temperature shape={tuple(temperature.shape)}; expected a float, [{Sq}] or [{B}, {Sq}]"
        )
    if isinstance(temperature, torch.Tensor) and temperature.numel() > 0:
        t2 = temperature.to(torch.float64) ** 2
        if bool((t2 == t2.flatten()[0]).all()):  # one value: keep it in the softmax scale
            scale *= float(t2.flatten()[0])
        else:  # per-query temperatures (documents of different lengths): fold into q
            t2 = t2.expand(B, Sq)[:, :, None, None].to(q.dtype)
            qs = tuple(x * t2 for x in qs)
    elif temperature is not None and not isinstance(temperature, torch.Tensor):
        scale *= float(temperature) ** 2

    shared = q_positions.dim() == 1 and k_positions.dim() == 1 and q_doc_ids is None
    if shared or B == 0:
        return _block_one_layout(
            qs, k_rot, v, q_positions, k_positions, None, None, c, scale, lse_dtype
        )
    outs, lses = [], []
    for b in range(B):  # different layouts per row (packed documents): one row at a time
        o, s = _block_one_layout(
            tuple(x[b : b + 1] for x in qs),
            k_rot[b : b + 1],
            v[b : b + 1],
            q_positions.expand(B, Sq)[b],
            k_positions.expand(B, Sk)[b],
            None if q_doc_ids is None else q_doc_ids[b],
            None if k_doc_ids is None else k_doc_ids[b],
            c,
            scale,
            lse_dtype,
        )
        outs.append(o)
        lses.append(s)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)
