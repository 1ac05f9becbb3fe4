"""Block-sparse planning and the blockwise online-softmax engine behind ``attention_func``.

Every supported mask (causal, sliding window, chunked-local, documents, q_offset) gives each
query row one contiguous interval of visible keys ``[lo_r, hi_r)``, and both ends are
non-decreasing in r (documents are contiguous runs). The planner cuts the queries into blocks
and gives each block a few key *pieces*:

- ``full``: keys visible to every row of the block (one unmasked call);
- ``causal``: the square diagonal ``[i0, i0 + bq)``, top-left causal (``j - i0 <= r - r0``);
- ``masked``: the ragged rest, in tiles of at most ``block_k`` keys, with an explicit mask.

Key ranges no row can see are never visited, so a sliding window costs O(S * W) and chunked
attention O(S * c). Pieces are computed by a *tile kernel* (pure torch here, the fused ATen CPU
kernel in ``cpu_flash.py``) returning (out, lse), merged per block in fp32 by the exact rule of
docs/methods/conventions.md, "Merging partial results". The backward recomputes each piece with
the block's merged (out, lse) ("ring style", form 2 of "Backward of the merge" there), so
probabilities are already global and
``D_i = rowsum(dO * O) - dlse_i``.

Internal layout is [B, H, S, D] (transposed views of the public [B, S, H, D] tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_ext.ops.documents import document_runs

__all__ = ["Block", "Piece", "TorchTiles", "plan_blocks", "run_backward", "run_forward"]


@dataclass(frozen=True)
class Piece:
    """A key range [k0, k1) of one query block and how to compute it."""

    k0: int
    k1: int
    kind: str  # "full" | "causal" | "masked"


@dataclass
class Block:
    """Query rows [r0, r1) of batch row ``b`` (None = the whole batch) and their key pieces."""

    b: int | None
    r0: int
    r1: int
    pieces: list[Piece] = field(default_factory=list)


def visible_ranges(
    batch: int,
    sq: int,
    sk: int,
    *,
    causal: bool,
    window: int | None,
    chunk: int | None,
    q_offset: int,
    doc_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible key interval [lo, hi) of every query row (same mask rules as attention_ref).

    Returns:
        (lo, hi): int64 CPU tensors [Bp, Sq], Bp = batch with doc_ids else 1. Empty if lo >= hi.
    """
    i = torch.arange(sq, dtype=torch.int64) + q_offset
    lo = torch.zeros(1, sq, dtype=torch.int64)
    hi = (i + 1 if causal else torch.full((sq,), sk, dtype=torch.int64)).view(1, sq)
    if window is not None:
        lo = torch.maximum(lo, i - window + 1)
    pos_q = i
    if doc_ids is not None:
        ids = doc_ids.detach().cpu()
        _, pos = document_runs(ids)
        _, back = document_runs(ids.flip(-1))  # distance to the end of the run
        cols = torch.arange(sk, dtype=torch.int64)
        start, end = cols - pos, cols + back.flip(-1) + 1
        rows = slice(q_offset, q_offset + sq)
        lo = torch.maximum(lo.expand(batch, sq), start[:, rows])
        hi = torch.minimum(hi.expand(batch, sq), end[:, rows])
        pos_q = pos[:, rows]
    if chunk is not None:
        lo = torch.maximum(lo, i - pos_q % chunk)
    return lo.contiguous(), hi.contiguous()


def _row_blocks(lo: np.ndarray, hi: np.ndarray, block_q: int) -> list[tuple[int, int]]:
    """Cut rows into blocks of <= block_q, also where an interval end jumps (doc/chunk edges)."""
    n = len(lo)
    if n == 0:
        return []
    dlo, dhi = np.diff(lo), np.diff(hi)
    jump = ((dlo != 0) & (dlo != 1)) | ((dhi != 0) & (dhi != 1))
    edges = [0, *(np.flatnonzero(jump) + 1).tolist(), n]
    return [(r, min(r + block_q, b)) for a, b in zip(edges[:-1], edges[1:])
            for r in range(a, b, block_q)]  # fmt: skip


def _split(k0: int, k1: int, size: int | None, kind: str) -> list[Piece]:
    if k1 <= k0:
        return []
    if size is None:
        return [Piece(k0, k1, kind)]
    return [Piece(a, min(a + size, k1), kind) for a in range(k0, k1, size)]


def _plan_rows(
    lo: np.ndarray,
    hi: np.ndarray,
    b: int | None,
    *,
    causal: bool,
    q_offset: int,
    block_q: int,
    block_k: int,
    split_full: bool,
) -> list[Block]:
    blocks = []
    for r0, r1 in _row_blocks(lo, hi, block_q):
        blo, bhi = lo[r0:r1], hi[r0:r1]
        live = blo < bhi
        if not live.any():
            continue
        llo, lhi = blo[live], bhi[live]
        a, z = int(llo.min()), int(lhi.max())
        f0, f1 = int(blo.max()), int(bhi.min())  # keys every row sees (empty if a row is empty)
        i0, i1 = q_offset + r0, q_offset + r1
        pieces: list[Piece] = []
        full_size = block_k if split_full else None
        diag = causal and f0 <= i0 and bool((bhi == np.arange(i0 + 1, i1 + 1)).all())
        if diag:
            pieces += _split(f0, i0, full_size, "full") + [Piece(i0, i1, "causal")]
            masked = [(a, f0)]
        elif f0 < f1:
            pieces += _split(f0, f1, full_size, "full")
            masked = [(a, f0), (f1, z)]
        else:
            masked = [(a, z)]
        for m0, m1 in masked:
            for p in _split(m0, m1, block_k, "masked"):
                if (np.maximum(llo, p.k0) < np.minimum(lhi, p.k1)).any():
                    pieces.append(p)
        blocks.append(Block(b, r0, r1, pieces))
    return blocks


def plan_blocks(
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    causal: bool,
    q_offset: int,
    block_q: int,
    block_k: int,
    split_full: bool,
) -> list[Block]:
    """Plan query blocks and key pieces from the per-row intervals of ``visible_ranges``.

    Args:
        lo, hi: int64 [Bp, Sq]. With Bp > 1 and rows that differ, each batch row gets its own plan.
        causal: whether hi_r = i_r + 1 may form a causal diagonal piece.
        q_offset: absolute position of query row 0.
        block_q: max query rows per block.
        block_k: max keys per masked piece (and per full piece when ``split_full``).
        split_full: cut full pieces into block_k tiles (needed by kernels that materialise
            the score tile; the fused CPU kernel tiles internally and takes long full pieces).

    Returns:
        List of Blocks.
    """
    if lo.shape[0] == 1 or all(torch.equal(lo[0], x) and torch.equal(hi[0], y) for x, y in
                                zip(lo[1:], hi[1:])):  # fmt: skip
        rows = [(None, lo[0].numpy(), hi[0].numpy())]
    else:
        rows = [(b, lo[b].numpy(), hi[b].numpy()) for b in range(lo.shape[0])]
    blocks = []
    for b, lo_b, hi_b in rows:
        blocks += _plan_rows(
            lo_b, hi_b, b, causal=causal, q_offset=q_offset, block_q=block_q, block_k=block_k,
            split_full=split_full,
        )  # fmt: skip
    return blocks


def piece_mask(
    lo: torch.Tensor, hi: torch.Tensor, blk: Block, piece: Piece, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [Bp, bq, bk] of a masked piece (None for full / causal pieces)."""
    if piece.kind != "masked":
        return None
    rows = slice(blk.r0, blk.r1)
    bsel = slice(None) if blk.b is None else slice(blk.b, blk.b + 1)
    lo_b, hi_b = lo[bsel, rows, None].to(device), hi[bsel, rows, None].to(device)
    j = torch.arange(piece.k0, piece.k1, device=device).view(1, 1, -1)
    return (j >= lo_b) & (j < hi_b)


def _merge2(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partials ([b, H, bq, D], [b, H, bq]) in the lse dtype (fp32/fp64)."""
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1, w2 = torch.exp(l1 - safe).unsqueeze(-1), torch.exp(l2 - safe).unsqueeze(-1)
    return w1 * o1.to(lse.dtype) + w2 * o2.to(lse.dtype), lse


def run_forward(kernel, plan: list[Block], lo, hi, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill out [B, H, Sq, D] (view) and lse [B, H, Sq]; rows without keys must be 0 / -inf."""
    for blk in plan:
        bsel = slice(None) if blk.b is None else slice(blk.b, blk.b + 1)
        acc_o = acc_l = None
        for piece in blk.pieces:
            mask = piece_mask(lo, hi, blk, piece, out.device)
            o, lp = kernel.fwd(bsel, blk.r0, blk.r1, piece, mask)
            acc_o, acc_l = (o, lp) if acc_o is None else _merge2(acc_o, acc_l, o, lp)
        if acc_o is not None:
            out[bsel, :, blk.r0 : blk.r1] = acc_o.to(out.dtype)
            lse[bsel, :, blk.r0 : blk.r1] = acc_l.to(lse.dtype)


def run_backward(kernel, plan: list[Block], lo, hi, dq, dk, dv) -> None:
    """Accumulate gradients into dq [B, H, Sq, D], dk / dv [B, Hkv, Sk, D] (zero-initialised)."""
    for blk in plan:
        bsel = slice(None) if blk.b is None else slice(blk.b, blk.b + 1)
        for piece in blk.pieces:
            mask = piece_mask(lo, hi, blk, piece, dq.device)
            gq, gk, gv = kernel.bwd(bsel, blk.r0, blk.r1, piece, mask)
            dq[bsel, :, blk.r0 : blk.r1] += gq
            dk[bsel, :, piece.k0 : piece.k1] += gk
            dv[bsel, :, piece.k0 : piece.k1] += gv


class TorchTiles:
    """Pure-torch tile kernel: any device, fp32 maths (fp64 for fp64 inputs), GQA without copies.

    Query head h = g * rep + t is grouped with KV head g, so one matmul per tile serves all
    ``rep`` heads of a group: q [b, Hkv, rep * bq, D] @ k [b, Hkv, D, bk].
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        # q: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D] (views)
        self.q, self.k, self.v, self.scale = q, k, v, scale
        self.cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.rep = q.shape[1] // k.shape[1]

    def set_grads(self, do: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse) -> None:
        """Store backward inputs: do, o [B, H, Sq, D]; lse, dlse [B, H, Sq] (dlse may be None)."""
        self.do, self.o, self.dlse = do, o, dlse
        self.lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    def _group(self, x: torch.Tensor) -> torch.Tensor:  # [b, H, n, ...] -> [b, Hkv, rep*n, ...]
        b, _, n = x.shape[:3]
        return x.to(self.cdt).reshape(b, self.k.shape[1], self.rep * n, *x.shape[3:])

    def _ungroup(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.reshape(x.shape[0], self.q.shape[1], n, *x.shape[3:])

    def _scores(self, bsel, r0, r1, piece, mask):
        qg = self._group(self.q[bsel, :, r0:r1])
        kk = self.k[bsel, :, piece.k0 : piece.k1].to(self.cdt)
        s = torch.matmul(qg, kk.transpose(-1, -2)) * self.scale  # [b, Hkv, rep*bq, bk]
        b, g, _, bk = s.shape
        s = s.view(b, g, self.rep, r1 - r0, bk)
        if piece.kind == "causal":
            keep = torch.ones(r1 - r0, bk, dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        elif mask is not None:
            s = s.masked_fill(~mask[:, None, None], float("-inf"))
        return qg, kk, s.view(b, g, self.rep * (r1 - r0), bk)

    def fwd(self, bsel, r0, r1, piece, mask):
        _, _, s = self._scores(bsel, r0, r1, piece, mask)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        vv = self.v[bsel, :, piece.k0 : piece.k1].to(self.cdt)
        o = torch.matmul(p, vv) / torch.where(denom > 0, denom, torch.ones_like(denom))
        lse = (m + torch.log(denom)).squeeze(-1)  # -inf where no key is visible
        return self._ungroup(o, r1 - r0), self._ungroup(lse, r1 - r0)

    def bwd(self, bsel, r0, r1, piece, mask):
        qg, kk, s = self._scores(bsel, r0, r1, piece, mask)
        p = torch.exp(s - self._group(self.lse[bsel, :, r0:r1]).unsqueeze(-1))
        do = self._group(self.do[bsel, :, r0:r1])
        delta = (do * self._group(self.o[bsel, :, r0:r1])).sum(-1)
        if self.dlse is not None:
            delta = delta - self._group(self.dlse[bsel, :, r0:r1])
        vv = self.v[bsel, :, piece.k0 : piece.k1].to(self.cdt)
        dv = torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, vv.transpose(-1, -2)) - delta.unsqueeze(-1))
        dq = torch.matmul(ds, kk) * self.scale
        dk = torch.matmul(ds.transpose(-1, -2), qg) * self.scale
        return self._ungroup(dq, r1 - r0), dk, dv
