"""Sequence layouts for context parallelism: which tokens each rank holds, and the way back.

Follows docs/context_parallel.md, "Layouts". A row is split *per document* (a row without
``doc_ids`` is one document). A document of length n is padded to a multiple of the number of
slices and cut into equal slices of ``c = ceil(n / slices)`` tokens:

- ``"contiguous"``: P slices; rank r holds slice r;
- ``"zigzag"``: 2P slices; rank r holds slices r and 2P-1-r (balanced causal work).

Each rank holds ``c`` (contiguous) or ``2c`` (zigzag) tokens of every document, so all ranks
hold the same number of tokens per row. Padding tokens (at most ``slices - 1`` per document,
at the end of the document, so lengths may be odd or shorter than 2P) have position -1: they
are never visible as keys, see nothing as queries, take ``pad_value`` (e.g. label -100) and are
dropped exactly by ``unshard_tensors``; nothing is rounded down. Rows whose documents need fewer
slots than the longest row are filled with padding at the end.

Every slot carries its global index, its per-document position and its document number, for
every rank: ``CPLayout`` is pure index maths, identical on all ranks and testable without a
process group. ``shard`` / ``unshard`` are the process-group entry points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ext.parallel import comm

__all__ = [
    "LAYOUTS",
    "CPLayout",
    "make_layout",
    "resolve_layout",
    "shard",
    "shard_tensor",
    "unshard",
    "unshard_tensors",
]

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True, eq=False)
class CPLayout:
    """Where every token of a (packed) batch lives under context parallelism.

    Tensors are CPU int64 [P, Bl, L] (Bl = 1 when the layout is shared by the batch, i.e. no
    ``doc_ids``; else B). Slot ``[r, b, s]`` is local token s of row b on rank r.
    """

    kind: str
    """``"contiguous"`` or ``"zigzag"``."""
    world_size: int
    """P, the number of context-parallel ranks."""
    seq_len: int
    """S, the global (unpadded) sequence length."""
    index: torch.Tensor
    """Global sequence index of each slot; -1 for padding."""
    positions: torch.Tensor
    """Per-document position of each slot; -1 for padding."""
    doc_ids: torch.Tensor
    """Document number within the row (0, 1, ... in order); padding keeps its neighbour's."""
    doc_lengths: torch.Tensor
    """Length of the slot's document (0 for padding)."""

    @property
    def local_len(self) -> int:
        """L, the tokens (real and padding) each rank holds per row."""
        return self.index.shape[-1]

    def meta(self, rank: int, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, doc_ids) of rank ``rank``: int64 [Bl, L], or [batch, L] when given."""
        pos, doc = self.positions[rank], self.doc_ids[rank]
        if batch is not None:
            pos, doc = _rows_for(pos, batch), _rows_for(doc, batch)
        return pos, doc


def _rows_for(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] not in (1, batch):
        raise ValueError(f"layout has {x.shape[0]} rows; the tensor has batch {batch}")
    return x.expand(batch, *x.shape[1:])


def _doc_runs(doc_ids: torch.Tensor | None, seq_len: int) -> list[list[tuple[int, int]]]:
    """(start, length) of every document, per row; documents are maximal runs of equal ids."""
    if doc_ids is None:
        return [[(0, seq_len)]]
    rows = []
    for row in doc_ids.detach().cpu().tolist():
        runs, start = [], 0
        for s in range(1, seq_len + 1):
            if s == seq_len or row[s] != row[s - 1]:
                runs.append((start, s - start))
                start = s
        rows.append(runs)
    return rows


def make_layout(
    kind: str, seq_len: int, world_size: int, *, doc_ids: torch.Tensor | None = None
) -> CPLayout:
    """Build the layout of a batch of sequences of length ``seq_len`` over ``world_size`` ranks.

    Args:
        kind: "contiguous" or "zigzag" (see the module docstring).
        seq_len: S >= 1.
        world_size: P >= 1.
        doc_ids: optional int [B, S]; each maximal run of equal ids is a document, sliced on
            its own (positions restart at 0 in each).

    Returns:
        A CPLayout (pure tensors, no process group involved).
    """
    if kind not in LAYOUTS:
        raise ValueError(f"layout={kind!r}; expected one of {LAYOUTS}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}; expected an int >= 1")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}; expected an int >= 1")
    if doc_ids is not None and (
        not isinstance(doc_ids, torch.Tensor)
        or doc_ids.dim() != 2
        or doc_ids.shape[1] != seq_len
        or doc_ids.is_floating_point()
    ):
        got = tuple(doc_ids.shape) if isinstance(doc_ids, torch.Tensor) else doc_ids
        raise ValueError(f"doc_ids={got}; expected an int tensor [B, S={seq_len}]")
    P = world_size
    n_slices = 2 * P if kind == "zigzag" else P
    rows = []  # per row: (per-rank [4, L_b] tables of index, position, doc, length; n_docs)
    for runs in _doc_runs(doc_ids, seq_len):
        per_rank: list[list[torch.Tensor]] = [[] for _ in range(P)]
        for d, (start, n) in enumerate(runs):
            c = math.ceil(n / n_slices)
            for r in range(P):
                slices = (r, n_slices - 1 - r) if kind == "zigzag" else (r,)
                pos = torch.cat([torch.arange(s * c, (s + 1) * c) for s in slices])
                real = pos < n
                fields = [torch.where(real, f, -1) for f in (start + pos, pos)]
                fields += [torch.full_like(pos, d), torch.where(real, n, 0)]
                per_rank[r].append(torch.stack(fields))
        rows.append(([torch.cat(parts, 1) for parts in per_rank], len(runs)))
    L = max(tables[0].shape[1] for tables, _ in rows)
    table = torch.full((4, P, len(rows), L), -1, dtype=torch.int64)
    for b, (tables, n_docs) in enumerate(rows):
        table[2, :, b] = n_docs  # trailing padding: a document number of its own
        for r in range(P):
            table[:, r, b, : tables[r].shape[1]] = tables[r]
    table[3].clamp_(min=0)  # trailing padding: document length 0
    return CPLayout(kind, P, seq_len, *table.unbind(0))


def resolve_layout(
    layout: str | CPLayout,
    *,
    world_size: int,
    seq_len: int | None = None,
    local_len: int | None = None,
    doc_ids: torch.Tensor | None = None,
) -> CPLayout:
    """A CPLayout from a layout object or name.

    With a name, the global length is ``seq_len`` (or ``doc_ids.shape[1]``), else
    ``world_size * local_len`` (sequences that fill every shard exactly, no padding).
    """
    if isinstance(layout, CPLayout):
        if layout.world_size != world_size:
            raise ValueError(
                f"layout.world_size={layout.world_size}; the group has {world_size} ranks"
            )
        if doc_ids is not None:
            raise ValueError("doc_ids is part of a CPLayout; pass one or the other")
        if local_len is not None and local_len != layout.local_len:
            raise ValueError(
                f"local length {local_len} does not match the layout's L={layout.local_len}"
            )
        return layout
    if seq_len is None:
        seq_len = doc_ids.shape[1] if doc_ids is not None else None
    if seq_len is None:
        if local_len is None:
            raise ValueError(f"layout={layout!r} needs seq_len to know the global length")
        per = 2 * world_size if layout == "zigzag" else world_size
        seq_len = world_size * local_len
        if local_len % (per // world_size):
            raise ValueError(
                f"local length {local_len} with layout={layout!r}: a zigzag shard holds two "
                "equal slices, so it must be even; build the layout with make_layout(kind, "
                "seq_len, world_size, doc_ids=...) for padded or packed sequences"
            )
    lay = make_layout(layout, seq_len, world_size, doc_ids=doc_ids)
    if local_len is not None and lay.local_len != local_len:
        raise ValueError(
            f"local length {local_len} does not match layout={layout!r} of S={seq_len} over "
            f"{world_size} ranks (L={lay.local_len})"
        )
    return lay


def _bs_view(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Move the sequence dim to 1 and the batch dim to 0 (batch is 0, or 1 when dim == 0)."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    return x.transpose(0, 1) if dim == 0 else x.movedim(dim, 1)


def _bs_unview(y: torch.Tensor, like_dim: int, dim: int) -> torch.Tensor:
    if like_dim == 1:
        return y.squeeze(0)
    return y.transpose(0, 1) if dim == 0 else y.movedim(1, dim)


def _norm_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim}; expected a dim of a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_tensor(
    x: torch.Tensor, layout: CPLayout, rank: int, *, dim: int = 1, pad_value: float = 0
) -> torch.Tensor:
    """This rank's part of a global tensor (pure; differentiable w.r.t. x).

    Args:
        x: global tensor with the sequence (length S) at ``dim``; the batch is dim 0 (dim 1 when
            ``dim == 0``), needed only when the layout differs per row.
        layout: the CPLayout. rank: 0 <= rank < P.
        dim: sequence dim. pad_value: value of padding slots (e.g. -100 for labels).

    Returns:
        Tensor with ``L = layout.local_len`` at ``dim``.
    """
    dim = _norm_dim(x, dim)
    if x.shape[dim] != layout.seq_len:
        raise ValueError(f"x.shape[{dim}]={x.shape[dim]}; expected S={layout.seq_len}")
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank={rank}; expected 0 <= rank < {layout.world_size}")
    xs = _bs_view(x, dim)
    idx = _rows_for(layout.index[rank], xs.shape[0]).to(x.device)
    rows = torch.arange(xs.shape[0], device=x.device)[:, None]
    y = xs[rows, idx.clamp(min=0)]
    pad = (idx < 0).view(*idx.shape, *([1] * (y.dim() - 2)))
    y = torch.where(pad, torch.as_tensor(pad_value, dtype=y.dtype, device=y.device), y)
    return _bs_unview(y, x.dim(), dim)


def unshard_tensors(
    parts: list[torch.Tensor] | torch.Tensor, layout: CPLayout, *, dim: int = 1
) -> torch.Tensor:
    """Reassemble the global tensor from every rank's part (pure; padding dropped exactly).

    Args:
        parts: P tensors (or one stacked [P, ...] tensor) with L at ``dim``.
        layout: the CPLayout. dim: sequence dim of each part.

    Returns:
        Tensor with S = layout.seq_len at ``dim``; differentiable w.r.t. the parts.
    """
    parts = list(parts.unbind(0)) if isinstance(parts, torch.Tensor) else list(parts)
    if len(parts) != layout.world_size:
        raise ValueError(f"{len(parts)} parts; expected one per rank ({layout.world_size})")
    dim = _norm_dim(parts[0], dim)
    if parts[0].shape[dim] != layout.local_len:
        raise ValueError(
            f"parts[0].shape[{dim}]={parts[0].shape[dim]}; expected L={layout.local_len}"
        )
    xs = torch.cat([_bs_view(p, dim) for p in parts], 1)  # [B, P*L, ...]
    B = xs.shape[0]
    idx = torch.cat([_rows_for(layout.index[r], B) for r in range(layout.world_size)], 1)
    idx = idx.to(xs.device)
    real = idx >= 0
    rows = torch.arange(B, device=xs.device)[:, None].expand_as(idx)
    out = xs.new_zeros(B, layout.seq_len, *xs.shape[2:])
    out = out.index_put((rows[real], idx[real]), xs[real])
    return _bs_unview(out, parts[0].dim(), dim)


def shard(
    x: torch.Tensor,
    *,
    layout: str | CPLayout,
    group: dist.ProcessGroup | None,
    dim: int = 1,
    doc_ids: torch.Tensor | None = None,
    pad_value: float = 0,
) -> torch.Tensor:
    """This rank's part of a global tensor (no communication).

    Args:
        x: global tensor, sequence at ``dim`` (batch at 0, or 1 when dim == 0).
        layout: "contiguous", "zigzag" or a CPLayout (from ``make_layout``).
        group: the context-parallel process group (None = default group).
        dim: sequence dim.
        doc_ids: int [B, S] documents of packed rows (with a layout name only).
        pad_value: value of padding slots.

    Returns:
        x's local part, ``layout.local_len`` long at ``dim``.
    """
    lay = resolve_layout(
        layout, world_size=dist.get_world_size(group), seq_len=x.shape[dim], doc_ids=doc_ids
    )
    return shard_tensor(x, lay, dist.get_rank(group), dim=dim, pad_value=pad_value)


def unshard(
    x: torch.Tensor,
    *,
    layout: str | CPLayout,
    group: dist.ProcessGroup | None,
    dim: int = 1,
    seq_len: int | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The global tensor from every rank's local part (inverse of ``shard``).

    Differentiable: forward all-gather, backward keeps this rank's slots of the (replicated)
    global gradient.

    Args:
        x: local part, ``L`` long at ``dim``.
        layout: "contiguous", "zigzag" or a CPLayout.
        group: the context-parallel process group.
        dim: sequence dim.
        seq_len: global S (layout names only; default P * L, or doc_ids.shape[1]).
        doc_ids: int [B, S] (layout names only).

    Returns:
        The global tensor, S long at ``dim``, on every rank.
    """
    dim = _norm_dim(x, dim)
    lay = resolve_layout(
        layout, world_size=dist.get_world_size(group), seq_len=seq_len,
        local_len=x.shape[dim], doc_ids=doc_ids,
    )  # fmt: skip
    return unshard_tensors(comm.gather_from_cp(x, group), lay, dim=dim)
