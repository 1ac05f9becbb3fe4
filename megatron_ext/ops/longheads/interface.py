"""LongHeads prefill attention, vectorised over batch, heads and query blocks (inference only).

Follows README.md in this folder in its batched form: keys are rotated once at
chunk-local positions (the same tensor the summaries use) and the query is rotated once per
selected slot t at (K - t) * w + (p mod w), so no key is ever re-rotated per query. Rows are
processed in query blocks; the largest tensors of a block are the gathered keys and values of the
selected chunks, [B, H, blk, K, w, D] each, so memory is bounded by the block size, never by S^2.

Rows p < begin_selective_length use plain causal RoPE attention at their original positions,
also block by block ([B, H, blk, <= begin_selective_length] logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_ext.ops.longheads.selection import (
    check_longheads_args,
    compute_dtype,
    longheads_select,
    summaries_from_local,
)
from megatron_ext.ops.rope import apply_rope

__all__ = ["longheads_attn_func", "longheads_selected_attn", "per_document"]

# Elements of one gathered [B, H, blk, K, w, D] tensor (or one block of plain logits) used to
# size the default query block: 2**25 fp32 elements = 128 MiB.
_BLOCK_BUDGET = 1 << 25
_MAX_BLOCK = 256


def _use_union(U: int, n: int, K: int, D: int) -> bool:
    """Whether a block of n query rows with K slots that select U distinct chunks between them
    (per batch row and gather group) attends through their union (``_union_attend``) rather
    than by per-query gather.

    The union's cost grows with U (its [.., K, U, w] logits), the gather's with D (the bytes it
    copies). On CPU (benchmarks/bench_longheads_chunks.py, docs/benchmarks.md) the union is
    4-14x faster at D = 64 and 128 while U is well below D, and no faster at D = 16; for
    decode-sized blocks (each chunk read by only a few queries) its fixed costs dominate.
    """
    return D >= 32 and U <= D and n * K >= 4 * U


def _masked_softmax(z: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of z where ``visible``; returns (p, lse).

    A row without visible keys gets p = 0 (so out = 0) and lse = -inf.
    """
    z = z.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(z - shift.unsqueeze(-1)), lse


def _softmax_out(
    z: torch.Tensor, visible: torch.Tensor, v: torch.Tensor, eq: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax over the last dim of z, then ``einsum(eq, p, v)``; returns (out, lse)."""
    p, lse = _masked_softmax(z, visible)
    return torch.einsum(eq, p, v), lse


def longheads_selected_attn(
    q: torch.Tensor,
    k_local: torch.Tensor,
    v: torch.Tensor,
    chunks: torch.Tensor,
    positions: torch.Tensor,
    *,
    chunk_len: int,
    theta: float = 10000.0,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows over their selected chunks with the LongHeads position re-layout.

    With the selected chunks c_1 < ... < c_K = a of row p, key j of chunk c_t sits at slot
    (t-1)*w + (j mod w) and the query at (K-1)*w + (p mod w); keys of c_1..c_{K-1} are all
    visible, in chunk a only j <= p (self-inclusive). Computed as
    <R_{(K-t)w + p mod w} q_p, R_{j mod w} k_j>, which has the same slot difference.

    Args:
        q: un-rotated queries [B, n, H, D].
        k_local: keys rotated at chunk-local positions, R_{j mod w} k_j, [B, Sk, Hkv, D], in the
            compute dtype (fp32, or fp64).
        v: values [B, Sk, Hkv, D].
        chunks: int64 [B, H, n, K], ascending per row, last entry = p // chunk_len
            (``longheads_select``); every chunk but the last must be complete (end <= Sk).
        positions: int [n] or [B, n], absolute positions of the rows (p < Sk).
        chunk_len: w.
        theta: RoPE base.
        softmax_scale: default 1/sqrt(D).

    Returns:
        (out [B, n, H, D], lse [B, H, n]) in the compute dtype of k_local.
    """
    kc, vc = _to_chunks(k_local, chunk_len), _to_chunks(v.to(k_local.dtype), chunk_len)
    Hkv = k_local.shape[2]
    return _attend_chunks(q, kc, vc, chunks, positions, Hkv, chunk_len, theta, softmax_scale)


def _to_chunks(x: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> contiguous [B * Hkv * ceil(S/w), w, D], zero-padded past S.

    Zero keys past S can only fall in a query's own chunk, beyond the query, where they are
    masked (zeros, not uninitialised memory, so masked values never carry NaN into the output).
    """
    B, S, Hkv, D = x.shape
    nck = -(-S // chunk_len)
    x = F.pad(x, (0, 0, 0, 0, 0, nck * chunk_len - S)).reshape(B, nck, chunk_len, Hkv, D)
    return x.permute(0, 3, 1, 2, 4).reshape(B * Hkv * nck, chunk_len, D)


def _attend_chunks(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    chunks: torch.Tensor,
    positions: torch.Tensor,
    num_kv_heads: int,
    chunk_len: int,
    theta: float,
    softmax_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``longheads_selected_attn`` on keys/values already laid out by ``_to_chunks``."""
    B, n, H, D = q.shape
    K, w = chunks.shape[-1], chunk_len
    cd = kc.dtype
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    Hkv = num_kv_heads
    n_rep = H // Hkv
    # Heads that share a KV head and the same chunks (selection="group") share one gather.
    per_group = chunks.reshape(B, Hkv, n_rep, n, K)
    shared = n_rep > 1 and bool((per_group == per_group[:, :, :1]).all())
    G = Hkv if shared else H  # distinct gathers per batch row
    chunks_g = chunks[:, ::n_rep] if shared else chunks  # [B, G, n, K]
    # Flat index of (batch, KV head, chunk) rows of kc: gathers whole contiguous [w, D] chunks.
    nck = kc.shape[0] // (B * Hkv)
    bi = torch.arange(B, device=q.device).view(B, 1, 1, 1) * (Hkv * nck)
    gi = (torch.arange(G, device=q.device) // (G // Hkv)).view(1, G, 1, 1) * nck
    flat = (bi + gi + chunks_g).reshape(B * G, n * K)  # rows of kc, per (batch, gather group)
    pos = positions.to(q.device).reshape(-1, n).long()  # [1 or B, n]
    t = torch.arange(K, device=q.device)  # slot index t-1
    slot_q = (K - 1 - t) * w + (pos % w).unsqueeze(-1)  # [1 or B, n, K]
    qx = q.to(cd).unsqueeze(2).expand(B, n, K, H, D).reshape(B, n * K, H, D)
    qr = apply_rope(qx, slot_q.reshape(slot_q.shape[0], n * K).squeeze(0), theta=theta)
    qr = qr.reshape(B, n, K, G, H // G, D).permute(0, 3, 4, 1, 2, 5)  # [B, G, rep, n, K, D]
    # Slots before the last are whole chunks; the last (own) chunk is causal, self-inclusive.
    own = torch.arange(w, device=q.device) <= (pos % w).unsqueeze(-1)  # [1 or B, n, w]
    visible = torch.ones(pos.shape[0], 1, 1, n, K, w, dtype=torch.bool, device=q.device)
    visible[..., -1, :] = own[:, None, None]
    visible = visible.reshape(pos.shape[0], 1, 1, n, K * w)
    plan = _union_plan(flat, n, K, D)
    if plan is not None:
        out, lse = _union_attend(qr, kc, vc, *plan, visible, scale)
    else:
        out, lse = _gather_attend(qr, kc, vc, flat, visible, scale)
    return out.reshape(B, n, H, D), lse.reshape(B, H, n)


def _union_plan(
    flat: torch.Tensor, n: int, K: int, D: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``_chunk_union(flat)`` when the block should attend through it, else None.

    Each query selects K distinct chunks, so U >= K, and ``_use_union`` only gets stricter as
    U grows: when it refuses U = K (decode steps, small head dims) the sort is skipped.
    """
    if not _use_union(K, n, K, D):
        return None
    union, where = _chunk_union(flat)
    return (union, where) if _use_union(union.shape[1], n, K, D) else None


def _chunk_union(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct chunk rows per gather group, and where each selection sits among them.

    flat: [R, m] chunk rows (R = batch x gather groups, m = rows x slots). Returns ``union``
    [R, U] (ascending, padded by repeating its largest entry) and ``where`` [R, m] with
    ``union.gather(1, where) == flat``.
    """
    srt = flat.sort(dim=1).values
    rank = torch.zeros_like(srt)
    rank[:, 1:] = (srt[:, 1:] != srt[:, :-1]).cumsum(1)
    union = srt[:, -1:].expand(-1, int(rank[:, -1].max()) + 1).contiguous()
    union.scatter_(1, rank, srt)  # equal values write the same entry
    return union, torch.searchsorted(union, flat)


def _gather_attend(
    qr: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, flat: torch.Tensor,
    visible: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query gather of the selected chunks: [B, G, n, K, w, D] keys and values."""
    B, G, rep, n, K, D = qr.shape
    w = kc.shape[1]
    kg = kc.index_select(0, flat.reshape(-1)).view(B, G, n, K, w, D)
    vg = vc.index_select(0, flat.reshape(-1)).view(B, G, n, K * w, D)
    z = torch.einsum("bgrnkd,bgnkjd->bgrnkj", qr, kg) * scale
    p, lse = _masked_softmax(z.reshape(B, G, rep, n, K * w), visible)
    return torch.einsum("bgrnj,bgnjd->bngrd", p, vg), lse


def _union_attend(
    qr: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, union: torch.Tensor,
    where: torch.Tensor, visible: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention through the U chunks a block selects between all its queries.

    Every (query, slot) is scored against all U chunks with one matmul and keeps its own
    chunk's columns; the probabilities are scattered back onto the U chunks for one matmul with
    their values. U x more multiply-adds than the gather, but D x fewer bytes moved per query,
    which wins while U is small against D (``_use_union``).
    """
    B, G, rep, n, K, D = qr.shape
    w, U = kc.shape[1], union.shape[1]
    R = B * G
    ku = kc.index_select(0, union.reshape(-1)).view(R, U * w, D)
    vu = vc.index_select(0, union.reshape(-1)).view(R, U * w, D)
    z = torch.matmul(qr.reshape(R, rep * n * K, D), ku.transpose(1, 2)) * scale
    idx = where.view(R, 1, n, K, 1, 1).expand(R, rep, n, K, 1, w)
    z = z.view(R, rep, n, K, U, w).gather(4, idx).view(B, G, rep, n, K * w)
    p, lse = _masked_softmax(z, visible)
    dense = torch.zeros(R, rep, n, U, w, dtype=p.dtype, device=p.device)
    dense.scatter_add_(3, idx.view(R, rep, n, K, w), p.view(R, rep, n, K, w))
    out = torch.matmul(dense.view(R, rep * n, U * w), vu).view(B, G, rep, n, D)
    return out.permute(0, 3, 1, 2, 4), lse


def _plain_block(
    q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, p0: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of rows p0..p0+n-1 over keys 0..p0+n-1 (all rotated at true positions)."""
    B, n, H, D = q_rot.shape
    Hkv = k_rot.shape[2]
    qq = q_rot.reshape(B, n, Hkv, H // Hkv, D)
    z = torch.einsum("bigrd,bjgd->bgrij", qq, k_rot[:, : p0 + n]) * scale  # [B, g, rep, n, j]
    rows = torch.arange(p0, p0 + n, device=q_rot.device)
    visible = torch.arange(p0 + n, device=q_rot.device) <= rows.unsqueeze(-1)  # [n, p0 + n]
    out, lse = _softmax_out(z, visible, v[:, : p0 + n], "bgrij,bjgd->bigrd")
    return out.reshape(B, n, H, D), lse.reshape(B, H, n)


def _default_block(per_row: int) -> int:
    return max(1, min(_MAX_BLOCK, _BLOCK_BUDGET // max(1, per_row)))


def per_document(fn, q, k, v, doc_ids: torch.Tensor, return_lse: bool, **kw):
    """Run a whole-sequence LongHeads function on each document of packed rows separately.

    Documents are maximal runs of equal ``doc_ids`` [B, S]; each is a sequence of its own.
    """
    B, S, H, D = q.shape
    if tuple(doc_ids.shape) != (B, S) or doc_ids.is_floating_point():
        raise ValueError(f"doc_ids shape={tuple(doc_ids.shape)} dtype={doc_ids.dtype}; expected "
                         f"an int tensor [B, S] = [{B}, {S}]")
    ids = doc_ids.detach().cpu()
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=compute_dtype(q), device=q.device)
    for b in range(B):
        cuts = [0, *((ids[b, 1:] != ids[b, :-1]).nonzero().flatten() + 1).tolist(), S]
        for s0, s1 in zip(cuts[:-1], cuts[1:]):
            rows = slice(s0, s1)
            o, lse_d = fn(q[b : b + 1, rows], k[b : b + 1, rows], v[b : b + 1, rows],
                          return_lse=True, **kw)
            out[b, rows], lse[b, :, rows] = o[0], lse_d[0].to(lse.dtype)
    return (out, lse) if return_lse else out


@torch.no_grad()
def longheads_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_len: int = 256,
    num_chunks: int = 16,
    theta: float = 10000.0,
    softmax_scale: float | None = None,
    begin_selective_length: int | None = None,
    selection: str = "head",
    return_lse: bool = False,
    block_size: int | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LongHeads prefill over whole sequences (training-free chunk retrieval per head).

    Query p >= begin_selective_length attends to K = num_chunks chunks of w = chunk_len tokens:
    chunks 0, a-1, a (a = p // w) and the K-3 chunks of {1..a-2} whose summaries r_c score highest
    against the raw q_p, with positions re-laid so that every distance is < K*w; its own chunk is
    causal and includes p itself. Queries p < begin_selective_length use plain causal RoPE
    attention. Causal convention: query row i sees keys j <= i (S_q == S_k, positions 0..S-1).
    Inference only: runs under no_grad and returns tensors without a graph.

    Args:
        q: un-rotated queries [B, S, H, D].
        k: un-rotated keys [B, S, Hkv, D], H % Hkv == 0.
        v: values [B, S, Hkv, D].
        chunk_len: w (>= 1).
        num_chunks: K (>= 3).
        theta: RoPE base.
        softmax_scale: default 1/sqrt(D); also used inside the chunk summaries.
        begin_selective_length: first position that selects chunks; default K*w, must be
            >= (K-1)*w (values in [(K-1)*w, K*w] are equivalent).
        selection: "head" (per query head) or "group" (mean score over a KV group's heads).
        return_lse: also return lse.
        block_size: query rows per block (memory knob); default sized so a gathered
            [B, H, blk, K, w, D] tensor holds about 2**25 elements.
        doc_ids: optional int [B, S] of packed rows: each maximal run of equal ids is a document
            with its own positions from 0, its own chunk grid, first chunk and local window;
            no chunk of another document is ever selected (documents are independent).

    Returns:
        out [B, S, H, D] in q's dtype, and if return_lse, lse [B, H, S] (fp32; fp64 for fp64 q).
    """
    b_sel = check_longheads_args(
        q,
        k,
        v,
        chunk_len=chunk_len,
        num_chunks=num_chunks,
        begin_selective_length=begin_selective_length,
        selection=selection,
    )
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size={block_size!r}; expected None or an int >= 1")
    if doc_ids is not None:
        kw = {"chunk_len": chunk_len, "num_chunks": num_chunks, "theta": theta,
              "softmax_scale": softmax_scale, "begin_selective_length": begin_selective_length,
              "selection": selection, "block_size": block_size}
        return per_document(longheads_attn_func, q, k, v, doc_ids, return_lse, **kw)
    B, S, H, D = q.shape
    Hkv, w, K = k.shape[2], chunk_len, num_chunks
    cd = compute_dtype(q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    out = torch.empty(B, S, H, D, dtype=cd, device=q.device)
    lse = torch.empty(B, H, S, dtype=cd, device=q.device)

    n_plain = min(S, b_sel)
    if n_plain:
        pos = torch.arange(n_plain, device=q.device)
        q_rot = apply_rope(qf[:, :n_plain], pos, theta=theta)
        k_rot = apply_rope(kf[:, :n_plain], pos, theta=theta)
        blk = block_size or _default_block(B * H * n_plain)
        for p0 in range(0, n_plain, blk):
            p1 = min(n_plain, p0 + blk)
            out[:, p0:p1], lse[:, :, p0:p1] = _plain_block(q_rot[:, p0:p1], k_rot, vf, p0, scale)

    if b_sel < S:
        loc = torch.arange(S, device=q.device) % w
        k_loc = apply_rope(kf, loc, theta=theta)  # shared by the summaries and the attention
        last = (S - 1) // w - 1  # summaries needed up to chunk a - 2 of the last row
        n_sum = last * w  # tokens of chunks 0..last-1
        r = summaries_from_local(
            apply_rope(qf[:, :n_sum], loc[:n_sum], theta=theta),
            k_loc[:, :n_sum],
            vf[:, :n_sum],
            w,
            scale,
        )
        kc, vc = _to_chunks(k_loc, w), _to_chunks(vf, w)  # laid out once for all blocks
        blk = block_size or _default_block(B * H * K * w * D)
        for p0 in range(b_sel, S, blk):
            p1 = min(S, p0 + blk)
            rows = torch.arange(p0, p1, device=q.device)
            chunks = longheads_select(
                qf[:, p0:p1],
                r,
                rows,
                chunk_len=w,
                num_chunks=K,
                selection=selection,
                num_kv_heads=Hkv,
            )
            out[:, p0:p1], lse[:, :, p0:p1] = _attend_chunks(
                qf[:, p0:p1], kc, vc, chunks, rows, Hkv, w, theta, scale
            )
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
