"""Per-token metadata of an attention call, and the one rule for the dynamic-NTK length.

Every method's mask and position rule reads the same three things about a token: its absolute
per-document position (negative = a padding slot, never visible), its document id and the
length of its document as the batch shows it (max position + 1, the DCA temperature length),
or a fixed length when the caller sets one. ``Meta`` holds them as CPU int64 [B, n] tensors:
they drive host-side planning (key intervals, halo plans) and never force a device sync.

Dynamic NTK and the Qwen DCA temperature depend on a *length*. One rule serves every method,
with and without context parallelism (``rope_length``): a fixed ``seq_len`` when the caller
gives one, else the largest position of the whole (global) batch + 1 -- Hugging Face's rule
for dynamic NTK. Context parallelism computes it from the global layout, so every rank uses
the same L as one process would.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from megatron_ext.ops.documents import document_lengths, document_runs

__all__ = ["Meta", "call_metas", "cat_meta", "offset_metas", "rope_length", "token_meta"]


class Meta(NamedTuple):
    """Per-token metadata of a query or key block: int64 CPU tensors [B, n]."""

    positions: torch.Tensor
    """Per-document position; -1 for padding."""
    doc_ids: torch.Tensor
    """Document id within the row (equal id = same document)."""
    lengths: torch.Tensor
    """Length of the token's document as the batch shows it, or the fixed seq_len (0 padding)."""


def _rows(x: torch.Tensor, name: str, batch: int | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.dim() not in (1, 2):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}={got}; expected an integer tensor [S] or [B, S]")
    x = x.detach().to("cpu", torch.int64)
    x = x.unsqueeze(0) if x.dim() == 1 else x
    if batch is not None and x.shape[0] not in (1, batch):
        raise ValueError(f"{name}.shape={tuple(x.shape)}; expected [S] or [{batch}, S]")
    return x.expand(batch, -1) if batch is not None else x


def token_meta(
    positions: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
) -> Meta:
    """Meta of a block from explicit positions (and document ids).

    Args:
        positions: int [S] or [B, S] per-document positions (negative = padding).
        doc_ids: optional int [S] or [B, S]; None = one document per row.
        batch: expand shared [S] inputs to this many rows.
        seq_len: fixed length for length rules (DCA temperature); None = what the block shows.

    Returns:
        Meta with CPU int64 [B, S] tensors.
    """
    pos = _rows(positions, "positions", batch)
    ids = torch.zeros_like(pos) if doc_ids is None else _rows(doc_ids, "doc_ids", pos.shape[0])
    if ids.shape != pos.shape:
        raise ValueError(f"doc_ids.shape={tuple(ids.shape)}; expected {tuple(pos.shape)}")
    if seq_len is not None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}; expected None or an int >= 1")
        lengths = torch.full_like(pos, seq_len)
    elif pos.numel():
        lengths = document_lengths(pos, None if doc_ids is None else ids)
    else:
        lengths = torch.zeros_like(pos)
    return Meta(pos, ids, torch.where(pos >= 0, lengths, 0))


def cat_meta(metas: list[Meta]) -> Meta:
    """Metadata of blocks concatenated along the sequence, in list order."""
    return Meta(*(torch.cat(parts, 1) for parts in zip(*metas)))


def rope_length(positions: Iterable[torch.Tensor], seq_len: int | None = None) -> int:
    """Dynamic-NTK length L: ``seq_len`` when fixed, else the largest position + 1 (>= 1).

    Pass every position tensor of the *global* batch (all ranks' under context parallelism).
    """
    if seq_len is not None:
        return int(seq_len)
    top = [int(p.max()) for p in positions if p.numel()]
    return max(max(top, default=0) + 1, 1)


def offset_metas(
    batch: int,
    sq: int,
    sk: int,
    *,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    seq_len: int | None = None,
) -> tuple[Meta, Meta]:
    """Query and key Meta of the index form used by ``attention_func``-style ops.

    Keys are indices 0..Sk-1 of packed rows, query row r is index ``q_offset + r``. Positions
    restart at 0 in every document (a maximal run of equal ``doc_ids``); without doc_ids a row
    is one document. Document lengths count indices below ``q_offset + Sq`` (what a causal query
    has seen), or are ``seq_len`` when given.

    Returns:
        (q_meta, k_meta), CPU int64 [B, Sq] / [B, Sk].
    """
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset={q_offset!r}; expected an int >= 0")
    if doc_ids is None:
        run = torch.zeros(batch, sk, dtype=torch.int64)
        pos = torch.arange(sk, dtype=torch.int64).expand(batch, sk)
    else:
        if tuple(doc_ids.shape) != (batch, sk) or doc_ids.is_floating_point():
            raise ValueError(f"doc_ids shape={tuple(doc_ids.shape)} dtype={doc_ids.dtype}; "
                             f"expected an int tensor [B, Sk] = [{batch}, {sk}]")
        if q_offset + sq > sk:
            raise ValueError(f"q_offset + Sq = {q_offset} + {sq} > Sk = {sk}; with doc_ids the "
                             "query rows must be key rows")
        run, pos = document_runs(doc_ids.detach().to("cpu", torch.int64))
    total = min(q_offset + sq, sk)
    if seq_len is not None:
        km = token_meta(pos, run, seq_len=seq_len)
    else:
        seen = document_lengths(pos[:, :total], run[:, :total]) if total else pos[:, :0]
        rest = document_lengths(pos[:, total:], run[:, total:]) if total < sk else pos[:, :0]
        km = Meta(pos, run, torch.cat((seen, rest), 1))
    if doc_ids is None and q_offset + sq > sk:  # queries beyond the keys (non-causal use)
        qpos = torch.arange(q_offset, q_offset + sq, dtype=torch.int64).expand(batch, sq)
        qlen = torch.full_like(qpos, seq_len or q_offset + sq)
        return Meta(qpos, torch.zeros_like(qpos), qlen), km
    rows = slice(q_offset, q_offset + sq)
    return Meta(pos[:, rows], run[:, rows], km.lengths[:, rows]), km


def call_metas(
    batch: int,
    sq: int,
    sk: int,
    *,
    q_positions: torch.Tensor | None,
    k_positions: torch.Tensor | None,
    q_doc_ids: torch.Tensor | None,
    k_doc_ids: torch.Tensor | None,
    q_offset: int,
    doc_ids: torch.Tensor | None,
    seq_len: int | None = None,
) -> tuple[Meta, Meta]:
    """Query and key Meta of a public op called in either form (and only one of them).

    Explicit form: ``q_positions`` / ``k_positions`` (both) with optional ``q_doc_ids`` /
    ``k_doc_ids`` (both or neither). Index form: ``q_offset`` and ``doc_ids`` (``offset_metas``).
    """
    if q_positions is not None or k_positions is not None:
        if q_positions is None or k_positions is None:
            raise ValueError("q_positions and k_positions: give both or neither")
        if q_offset or doc_ids is not None:
            raise ValueError("explicit positions and the index form (q_offset, doc_ids) are "
                             "exclusive; give one")
        if (q_doc_ids is None) != (k_doc_ids is None):
            raise ValueError("q_doc_ids and k_doc_ids: give both or neither")
        return (token_meta(q_positions, q_doc_ids, batch=batch, seq_len=seq_len),
                token_meta(k_positions, k_doc_ids, batch=batch, seq_len=seq_len))
    if q_doc_ids is not None or k_doc_ids is not None:
        raise ValueError("q_doc_ids / k_doc_ids go with explicit positions; the index form takes "
                         "doc_ids")
    return offset_metas(batch, sq, sk, q_offset=q_offset, doc_ids=doc_ids, seq_len=seq_len)
