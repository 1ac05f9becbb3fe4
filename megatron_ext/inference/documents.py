"""Packed documents inside a generation row: per-document positions and cache resets.

A row may hold several documents one after the other (``doc_ids``: equal id = same document,
ids non-decreasing along the row, so each document is one run). As in ``gpt_forward`` and the
whole-sequence LongHeads op with the same ``doc_ids``, every position rule reads the
per-document position (RoPE, window and chunk masks, DCA chunks, LongHeads chunks, chunk 0 and
the plain rows before ``K·w``), and no token attends across a document.

The caches need no document mask for this. Tokens arrive in order, a token only sees its own
document and only a row's last document can be continued, so when a new document starts the
row's caches are emptied (``reset_rows``) and the new document is stored from slot 0 at its
per-document positions: a cache row only ever holds the current document. A fed block is cut
at every column where some row starts a new document, so each piece holds one document per
row and every reset happens before the piece that needs it.

Tokens are addressed by their index in the row (-1 = padding); ``RowDocuments`` turns indices
and document ids into per-document positions and remembers, per row, the next index, the
current document's id and its first index. Tokens fed without ids continue the row's current
document (a row's first document has id 0), which is what decode does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Piece", "RowDocuments", "check_doc_ids"]


def check_doc_ids(doc_ids: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Validate document ids of packed rows -> CPU int64 [B, S].

    Args:
        doc_ids: int [B, S]; equal id = same document, non-decreasing along each row.
        shape: the expected (B, S), that of the tokens.

    Raises:
        ValueError: naming the bad value (type, dtype, shape, or the first decrease).
    """
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.is_floating_point() or \
            doc_ids.dtype == torch.bool:
        got = f"dtype={doc_ids.dtype}" if isinstance(doc_ids, torch.Tensor) else \
            type(doc_ids).__name__
        raise ValueError(f"doc_ids {got}; expected an integer tensor [B, S]")
    if tuple(doc_ids.shape) != tuple(shape):
        raise ValueError(f"doc_ids.shape={tuple(doc_ids.shape)}; expected [B, S] = "
                         f"{list(shape)}, the shape of the tokens")
    ids = doc_ids.detach().to("cpu", torch.int64)
    bad = (ids[:, 1:] < ids[:, :-1]).nonzero()
    if len(bad):
        b, i = (int(x) for x in bad[0])
        raise ValueError(f"doc_ids[{b}, {i + 1}]={int(ids[b, i + 1])} < doc_ids[{b}, {i}]="
                         f"{int(ids[b, i])}; expected ids non-decreasing along each row (every "
                         "document one run)")
    return ids


@dataclass
class Piece:
    """Columns of a fed block in which every row holds one document."""

    cols: slice
    positions: torch.Tensor
    """Per-document positions [B, m] of the piece's tokens (-1 = padding), CPU int64."""
    reset: torch.Tensor
    """Rows whose caches are emptied before the piece (a new document starts there)."""


class RowDocuments:
    """Per row: the next index, the current document's id and its first index.

    Args:
        batch: rows B.
        capacity: indices per row (the caches' capacity).
    """

    def __init__(self, batch: int, capacity: int) -> None:
        self.capacity = capacity
        self.next = torch.zeros(batch, dtype=torch.int64)
        self.doc = torch.zeros(batch, dtype=torch.int64)
        self.start = torch.zeros(batch, dtype=torch.int64)

    def split(self, positions: torch.Tensor, doc_ids: torch.Tensor | None = None) -> list[Piece]:
        """Per-document positions of a fed block, cut where a row starts a new document.

        Args:
            positions: int [B, n], each token's index in its row (-1 = padding); a row's real
                tokens, in column order, continue the row: next, next + 1, ...
            doc_ids: optional int [B, n] document ids (values at padding are ignored); equal
                to the row's current id continues its document, a larger one starts a new
                document. None: every token continues its row's current document.

        Returns:
            the pieces, in column order; the state moves past the block.

        Raises:
            ValueError: indices that do not continue a row or pass the capacity, or ids that
                decrease.
        """
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or \
                positions.dim() != 2 or positions.shape[0] != len(self.next):
            got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else positions
            raise ValueError(f"positions={got}; expected an integer tensor [{len(self.next)}, n]")
        idx_all = positions.detach().to("cpu", torch.int64)
        B, n = idx_all.shape
        ids_all = None
        if doc_ids is not None:
            if not isinstance(doc_ids, torch.Tensor) or tuple(doc_ids.shape) != (B, n) or \
                    doc_ids.is_floating_point():
                got = tuple(doc_ids.shape) if isinstance(doc_ids, torch.Tensor) else doc_ids
                raise ValueError(f"doc_ids={got}; expected an integer tensor [{B}, {n}] like "
                                 "positions")
            ids_all = doc_ids.detach().to("cpu", torch.int64)
        doc_pos = torch.full((B, n), -1, dtype=torch.int64)
        reset = torch.zeros(B, n, dtype=torch.bool)
        nxt, doc, start = self.next.clone(), self.doc.clone(), self.start.clone()
        for b in range(B):
            cols = (idx_all[b] >= 0).nonzero().flatten()
            if not len(cols):
                continue
            idx = idx_all[b, cols]
            want = torch.arange(len(idx)) + nxt[b]
            if not torch.equal(idx, want):
                raise ValueError(f"positions of row {b}: {_show(idx)}; expected the row's next "
                                 f"indices {_show(want)} in column order (-1 = padding)")
            if int(idx[-1]) >= self.capacity:
                raise ValueError(f"index {int(idx[-1])} of row {b} is past the cache capacity "
                                 f"{self.capacity}; create the session with a larger total "
                                 "length")
            ids = doc[b].expand(len(idx)) if ids_all is None else ids_all[b, cols]
            fresh = bool(nxt[b] == 0)
            prev = torch.cat(((ids[:1] if fresh else doc[b : b + 1]), ids[:-1]))
            if bool((ids < prev).any()):
                i = int((ids < prev).nonzero()[0])
                raise ValueError(f"doc_ids of row {b}: id {int(ids[i])} at index {int(idx[i])} "
                                 f"follows id {int(prev[i])}; expected ids non-decreasing along "
                                 "a row (a new document takes a larger id)")
            new = ids != prev
            if fresh:
                new[0] = True
            first = torch.where(new, idx, start[b]).cummax(0).values
            doc_pos[b, cols] = idx - first
            reset[b, cols] = new & (idx > 0)  # a row's first document finds its caches empty
            nxt[b], doc[b], start[b] = idx[-1] + 1, ids[-1], first[-1]
        self.next, self.doc, self.start = nxt, doc, start
        cuts = [0, *(c for c in range(1, n) if bool(reset[:, c].any())), n]
        return [Piece(slice(c0, c1), doc_pos[:, c0:c1], reset[:, c0].nonzero().flatten())
                for c0, c1 in zip(cuts[:-1], cuts[1:])]


def _show(x: torch.Tensor, limit: int = 6) -> str:
    vals = x.tolist()
    return str(vals) if len(vals) <= limit else f"[{', '.join(map(str, vals[:limit]))}, ...]"
