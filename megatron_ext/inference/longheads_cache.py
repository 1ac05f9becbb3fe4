"""The LongHeads KV cache: chunk-local keys, values and one summary per completed chunk.

LongHeads (docs/inference.md, "LongHeads decode") lets every head of a query at position p read
K chunks of w tokens: chunk 0, its own chunk a and the previous one, and the K - 3 chunks of
{1..a-2} whose summaries r_c score highest against the raw query; positions are re-laid so no
distance reaches K·w. Decoding token p applies exactly the prefill rule at p (the query sees
itself), so a decoded row equals the whole-sequence op's row. With packed documents every
rule (chunk grid, chunk 0, own and previous chunk, the plain rows before K·w) restarts at the
document's first token: positions are per-document and a row holds only its current document
(``documents.py`` empties the row when a new one starts), as the op with ``doc_ids`` computes.

What is kept per row (slot = per-document position):

- ``k_local``: R_{j mod w} k_j, the key form both the attention and the summaries use (the
  raw key is recoverable, so this is "raw K" in the form it is consumed), and ``v``;
- ``r``: one summary per query head per completed chunk, written once, when the chunk's last
  token arrives (it needs that chunk's raw queries and keys, kept in a w-slot ring: the only
  queries ever stored);
- ``k_true``: keys rotated at their real positions for the first K·w positions only, which the
  plain rows p < K·w attend (bounded, independent of the sequence length).

Per step the scores are [B, H, n, S/w] for n <= w new rows and the gathered chunks
[B, H, n, K·w, D]: bounded per step, nothing of size S x S.
"""

from __future__ import annotations

import torch

from megatron_ext.inference.attend import LayerMethod
from megatron_ext.inference.cache import write_rows
from megatron_ext.ops import Meta

__all__ = ["LongHeadsCache"]


class LongHeadsCache:
    """Cache of one LongHeads layer (see the module docstring).

    Args:
        lm: the layer's LongHeads method. batch: rows B. capacity: positions per row.
        heads, kv_heads, head_dim: H, Hkv, D. device: where tensors live (stored in fp32, the
            precision the LongHeads ops compute in).
    """

    def __init__(self, lm: LayerMethod, batch: int, capacity: int, heads: int, kv_heads: int,
                 head_dim: int, device: torch.device | str) -> None:
        assert lm.longheads is not None
        self.w = w = lm.longheads.chunk_len
        self.bsel = lm.begin_selective
        f32 = {"dtype": torch.float32, "device": device}
        self.k_local = torch.zeros(batch, capacity, kv_heads, head_dim, **f32)
        self.v = torch.zeros_like(self.k_local)
        n_true = min(capacity, self.bsel)
        self.k_true = torch.zeros(batch, n_true, kv_heads, head_dim, **f32)
        self.true_pos = torch.full((batch, n_true), -1, dtype=torch.int64)
        self.q_ring = torch.zeros(batch, w, heads, head_dim, **f32)
        self.k_ring = torch.zeros(batch, w, kv_heads, head_dim, **f32)
        self.r = torch.zeros(batch, max(capacity // w, 1), heads, head_dim, **f32)
        self.end = 0

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k_local, self.v, self.k_true, self.true_pos,
                                      self.q_ring, self.k_ring, self.r))

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty the given rows (a new document starts there).

        The new document is written from slot 0 on; a query at p only reads slots <= p of its
        own chunk, complete earlier chunks and their summaries, all rewritten by the new
        document before it arrives. Only the plain rows' keys are found by position, so their
        recorded positions are cleared.
        """
        self.true_pos[rows] = -1

    def step(self, lm: LayerMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             qm: Meta, lengths: torch.Tensor, rope_len: int) -> torch.Tensor:
        """Attention output [B, n, H, D] of new tokens (raw q, k, v [B, n, heads, D]).

        Each row of a block holds consecutive positions of one document (or -1 for padding),
        as chunked prefill and decode give them; the block is cut where any row starts a chunk
        so that a chunk's summary exists before any query that may select it.
        """
        pos = qm.positions
        cap = self.k_local.shape[1]
        if int(pos.max()) >= cap:
            raise ValueError(f"position {int(pos.max())} is past the cache capacity {cap}")
        # Columns where some row starts a chunk (rows may sit at different positions when
        # their documents start at different indices).
        cut = ((pos >= 0) & (pos % self.w == 0)).any(dim=0)
        outs = []
        i0, n = 0, pos.shape[1]
        while i0 < n:
            i1 = i0 + 1
            while i1 < n and not bool(cut[i1]):
                i1 += 1
            sl = slice(i0, i1)
            outs.append(self._sub_step(lm, q[:, sl], k[:, sl], v[:, sl], pos[:, sl]))
            i0 = i1
        return torch.cat(outs, 1).to(v.dtype)

    def _sub_step(self, lm: LayerMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:
        """New tokens of one chunk per row: store, attend, then summarise completed chunks."""
        w, bsel = self.w, self.bsel
        keep = pos >= 0
        slots = pos.clamp(min=0)
        write_rows(self.k_local, lm.lh_local_keys(k, pos), slots, keep)
        write_rows(self.v, v.float(), slots, keep)
        early = keep & (pos < bsel)
        write_rows(self.k_true, lm.lh_true_keys(k, pos), slots, early)
        write_rows(self.true_pos, pos, slots, early)
        write_rows(self.q_ring, q.float(), slots % w, keep)
        write_rows(self.k_ring, k.float(), slots % w, keep)
        self.end = max(self.end, int(pos.max()) + 1)

        B, n, H, D = q.shape
        out = torch.zeros(B, n, H, D, dtype=torch.float32, device=q.device)
        plain = early
        sel = keep & (pos >= bsel)
        if bool(plain.any()):
            hi = min(self.end, bsel)
            o, _ = lm.lh_plain(q, self.k_true[:, :hi], self.v[:, :hi],
                               torch.where(plain, pos, -1), self.true_pos[:, :hi])
            out = torch.where(plain.to(q.device)[..., None, None], o, out)
        if bool(sel.any()):
            # Rows without a selective query here get a stand-in position (chunk K, whose
            # inputs exist) and their result is dropped.
            spos = torch.where(sel, pos, bsel)
            nc = int(spos.max()) // w - 1
            o, _ = lm.lh_selective(q, self.r[:, :nc], self.k_local[:, : self.end],
                                   self.v[:, : self.end], spos)
            out = torch.where(sel.to(q.device)[..., None, None], o, out)
        self._summarise(lm, pos)
        return out

    def _summarise(self, lm: LayerMethod, pos: torch.Tensor) -> None:
        """Summaries of the chunks that the rows' last new token completed."""
        w = self.w
        last = pos.max(dim=1).values  # [B]
        done = (last >= 0) & ((last + 1) % w == 0)
        for c in sorted({int(x) // w for x in last[done]}):
            rows = (done & (last // w == c)).nonzero().flatten().to(self.q_ring.device)
            if c >= self.r.shape[1]:
                continue
            vals = self.v[rows, c * w : (c + 1) * w]
            self.r[rows, c : c + 1] = lm.lh_summaries(self.q_ring[rows], self.k_ring[rows], vals)
