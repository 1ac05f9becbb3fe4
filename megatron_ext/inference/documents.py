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
    ids = _as_ids(doc_ids, shape)
    bad = (ids[:, 1:] < ids[:, :-1]).nonzero()
    if len(bad):
        b, i = (int(x) for x in bad[0])
        raise ValueError(f"doc_ids[{b}, {i + 1}]={int(ids[b, i + 1])} < doc_ids[{b}, {i}]="
                         f"{int(ids[b, i])}; expected ids non-decreasing along each row (every "
                         "document one run)")
    return ids


def _as_ids(doc_ids: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """An integer tensor of the given shape -> CPU int64, else a ValueError naming it."""
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.is_floating_point() or \
            doc_ids.dtype == torch.bool:
        got = f"dtype={doc_ids.dtype}" if isinstance(doc_ids, torch.Tensor) else \
            type(doc_ids).__name__
        raise ValueError(f"doc_ids {got}; expected an integer tensor [B, S]")
    if tuple(doc_ids.shape) != tuple(shape):
        raise ValueError(f"doc_ids.shape={tuple(doc_ids.shape)}; expected [B, S] = "
                         f"{list(shape)}, the shape of the tokens")
    return doc_ids.detach().to("cpu", torch.int64)


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

    def advance(self, counts: torch.Tensor) -> None:
        """Rows fed outside ``split`` (context-parallel prefill), each in its current document:
        move every row's next index on by ``counts`` [B] tokens."""
        self.next += torch.as_tensor(counts, dtype=torch.int64).cpu()

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
        idx = positions.detach().to("cpu", torch.int64)
        B, n = idx.shape
        real = idx >= 0
        rank = real.long().cumsum(1) - 1  # the token's order among its row's real tokens
        want = self.next[:, None] + rank
        bad = (real & (idx != want)).any(1).nonzero().flatten()
        if len(bad):
            b = int(bad[0])
            raise ValueError(f"positions of row {b}: {_show(idx[b][real[b]])}; expected the "
                             f"row's next indices {_show(want[b][real[b]])} in column order "
                             "(-1 = padding)")
        top = idx.max(1).values
        if bool((top >= self.capacity).any()):
            b = int((top >= self.capacity).nonzero()[0])
            raise ValueError(f"index {int(top[b])} of row {b} is past the cache capacity "
                             f"{self.capacity}; create the session with a larger total length")
        ids = self.doc[:, None].expand(B, n) if doc_ids is None else _as_ids(doc_ids, (B, n))
        # Each real token's predecessor id: the previous real token of the block, else the
        # row's current document (a row's very first token has no predecessor: itself).
        col = torch.arange(n).expand(B, n)
        last = torch.where(real, col, -1).cummax(1).values  # last real column <= c
        before = torch.cat((torch.full((B, 1), -1), last[:, :-1]), 1)
        fresh = (self.next == 0)[:, None] & (rank == 0)
        outer = torch.where(fresh, ids, self.doc[:, None])
        prev = torch.where(before >= 0, ids.gather(1, before.clamp(min=0)), outer)
        down = (real & (ids < prev)).nonzero()
        if len(down):
            b, c = (int(x) for x in down[0])
            raise ValueError(f"doc_ids of row {b}: id {int(ids[b, c])} at index {int(idx[b, c])} "
                             f"follows id {int(prev[b, c])}; expected ids non-decreasing along "
                             "a row (a new document takes a larger id)")
        new = real & ((ids != prev) | fresh)
        first = torch.where(new, idx, self.start[:, None]).cummax(1).values
        doc_pos = torch.where(real, idx - first, -1)
        reset = new & (idx > 0)  # a row's first document finds its caches empty
        fed = real.any(1)
        self.next = torch.where(fed, top + 1, self.next)
        self.doc = torch.where(fed, ids.gather(1, last[:, -1:].clamp(min=0))[:, 0], self.doc)
        self.start = first[:, -1]
        cuts = [0, *(reset[:, 1:].any(0).nonzero().flatten() + 1).tolist(), n]
        return [Piece(slice(c0, c1), doc_pos[:, c0:c1], reset[:, c0].nonzero().flatten())
                for c0, c1 in zip(cuts[:-1], cuts[1:])]


def _show(x: torch.Tensor, limit: int = 6) -> str:
    vals = x.tolist()
    return str(vals) if len(vals) <= limit else f"[{', '.join(map(str, vals[:limit]))}, ...]"
