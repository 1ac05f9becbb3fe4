"""Dual Chunk Attention position rule, temperature and argument checks.

Shared by the dense reference and the pass-based fast path so that both read the same rule
(README.md, "Position rule"). Naming: ``chunk_size`` is M, the *largest* position index DCA ever
uses; ``local_size`` is W; the chunk length is ``C = M - W`` (the paper's "chunk size" is C).

Everything here is O(S) or O(Sq * Sk) integer work on small tensors; nothing rotates vectors.
"""

from __future__ import annotations

import math

import torch

from megatron_ext.ops.documents import document_runs

__all__ = [
    "dca_chunk_len",
    "dca_inter_position",
    "dca_position_rule",
    "dca_query_positions",
    "dca_temperature",
    "doc_runs",
]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_chunk_args(chunk_size: int, local_size: int) -> None:
    """Raise ValueError unless 0 <= local_size < chunk_size (both ints)."""
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(
            f"chunk_size={chunk_size!r}; expected an int >= 1 (M, the largest position)"
        )
    if not _is_int(local_size) or not 0 <= local_size < chunk_size:
        raise ValueError(
            f"local_size={local_size!r}; expected an int with 0 <= local_size < "
            f"chunk_size={chunk_size} (the chunk length is chunk_size - local_size)"
        )


def dca_chunk_len(chunk_size: int, local_size: int) -> int:
    """Chunk length ``C = chunk_size - local_size`` (M - W), after checking the arguments."""
    check_chunk_args(chunk_size, local_size)
    return chunk_size - local_size


def dca_inter_position(chunk_size: int, local_size: int) -> int:
    """Query position of the inter pass, ``P_inter = min(2C - 1, M)``.

    Both releases take the successive position of in-chunk offset C - 1; it equals M whenever
    C > W (every shipped configuration).
    """
    c = dca_chunk_len(chunk_size, local_size)
    return min(2 * c - 1, chunk_size)


def dca_query_positions(
    positions: torch.Tensor, *, chunk_size: int, local_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three rotation positions of each query: intra, successive and inter.

    Args:
        positions: int tensor (any shape) of per-document query positions i.

    Returns:
        (intra, succ, inter), each of positions.shape, int64: ``i mod C``,
        ``min(C + i mod C, M)`` and the constant ``P_inter``.
    """
    c = dca_chunk_len(chunk_size, local_size)
    local = positions.long() % c
    succ = (local + c).clamp(max=chunk_size)
    inter = torch.full_like(local, dca_inter_position(chunk_size, local_size))
    return local, succ, inter


def dca_position_rule(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remapped query and key positions for every (query, key) pair (README.md).

    With C = M - W and Δ = ⌊i/C⌋ - ⌊j/C⌋: the key sits at ``j mod C``; the query at ``i mod C``
    if Δ <= 0 (intra; pairs with j > i are not visible and are only given a value), at
    ``min(C + i mod C, M)`` if Δ = 1 (successive) and at ``P_inter`` if Δ >= 2 (inter).

    Args:
        q_positions: int tensor [..., Sq] of per-document query positions i.
        k_positions: int tensor [..., Sk] of per-document key positions j (leading dims
            broadcast with those of q_positions).

    Returns:
        (pos_q [..., Sq, Sk], pos_k [..., Sk]), int64.
    """
    c = dca_chunk_len(chunk_size, local_size)
    i = q_positions.long()
    j = k_positions.long()
    delta = (i // c).unsqueeze(-1) - (j // c).unsqueeze(-2)  # [..., Sq, Sk]
    intra, succ, inter = dca_query_positions(i, chunk_size=chunk_size, local_size=local_size)
    pos_q = torch.where(delta <= 0, intra.unsqueeze(-1), succ.unsqueeze(-1))
    pos_q = torch.where(delta >= 2, inter.unsqueeze(-1), pos_q)
    return pos_q, j % c


def dca_temperature(
    length: int | torch.Tensor, original_max_position_embeddings: int | None
) -> float | torch.Tensor:
    """Qwen2.5-1M / vLLM temperature ``T = max(1, 0.1 ln(L / L_o) + 1)``; logits scale by T².

    Args:
        length: L, an int or an int tensor (per query), the sequence or document length.
        original_max_position_embeddings: L_o; None or 0 disables the temperature (T = 1).

    Returns:
        T as a float (int length) or an fp64 tensor of length.shape.
    """
    lo = original_max_position_embeddings
    if lo is not None and (not _is_int(lo) or lo < 0):
        raise ValueError(
            f"original_max_position_embeddings={lo!r}; expected None, 0 (no temperature) or a "
            "positive int L_o"
        )
    if isinstance(length, torch.Tensor):
        if not lo:
            return torch.ones(length.shape, dtype=torch.float64, device=length.device)
        t = 0.1 * torch.log(length.to(torch.float64).clamp(min=1) / lo) + 1.0
        return t.clamp(min=1.0)
    if not _is_int(length) or length < 1:
        raise ValueError(f"length={length!r}; expected an int >= 1")
    return 1.0 if not lo else max(1.0, 0.1 * math.log(length / lo) + 1.0)


def doc_runs(
    doc_ids: torch.Tensor, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split packed rows into documents: a document is a maximal run of equal ids.

    Args:
        doc_ids: int tensor [B, S].
        limit: count document lengths only over row indices < limit (default S). This is the
            length seen by a call whose last query sits at index limit - 1.

    Returns:
        (run_ids [B, S], positions [B, S], lengths [B, S]), int64: a run id unique within the
        row, the 0-based position inside the document, and the document's length (over
        indices < limit) repeated on each of its tokens.
    """
    if doc_ids.dim() != 2 or doc_ids.dtype.is_floating_point:
        raise ValueError(
            f"doc_ids shape={tuple(doc_ids.shape)} dtype={doc_ids.dtype}; expected an int "
            "tensor [B, S]"
        )
    B, S = doc_ids.shape
    limit = S if limit is None else min(limit, S)
    idx = torch.arange(S, device=doc_ids.device).expand(B, S)
    run_ids, positions = document_runs(doc_ids)
    starts = idx - positions
    is_start = positions == 0
    # End (exclusive) of each run: the next start, found by a reversed running minimum.
    next_start = torch.where(is_start, idx, torch.full_like(idx, S))
    ends = next_start.flip(1).cummin(dim=1).values.flip(1)
    ends = torch.cat((ends[:, 1:], torch.full_like(ends[:, :1], S)), dim=1)
    lengths = (ends.clamp(max=limit) - starts).clamp(min=0)
    return run_ids, positions, lengths


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q [B, Sq, H, D], k and v [B, Sk, Hkv, D] agree (H % Hkv == 0)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}={got}; expected a float tensor [B, S, heads, D]")
    if k.shape != v.shape:
        raise ValueError(f"k.shape={tuple(k.shape)} != v.shape={tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}; batch and head dim must match"
        )
    if q.shape[3] % 2:
        raise ValueError(f"head dim D={q.shape[3]}; RoPE needs an even D")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"H={q.shape[2]}, Hkv={k.shape[2]}; expected H % Hkv == 0")


def dca_layout(
    batch: int,
    sq: int,
    sk: int,
    *,
    q_offset: int,
    doc_ids: torch.Tensor | None,
    seq_len: int | None,
    original_max_position_embeddings: int | None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Per-document positions, document ids and temperatures of one DCA call.

    Query row r is row index ``q_offset + r`` of the packed row; keys are indices 0..Sk-1. With
    ``doc_ids`` ([B, Sk]) a document is a maximal run of equal ids, positions restart at 0 in
    each, and the query rows take the ids at indices ``q_offset + r``. Always q_offset + Sq <= Sk.
    The temperature length L is ``seq_len`` when given, else the length of the query's document
    counted over indices < q_offset + Sq (without doc_ids: q_offset + Sq).

    Returns:
        (q_pos [B, Sq] or [Sq], k_pos [B, Sk] or [Sk], q_doc [B, Sq] | None, k_doc [B, Sk] | None,
        temperature [B, Sq] or [Sq], fp64). Without doc_ids everything is shared by the batch.
    """
    if not _is_int(q_offset) or q_offset < 0:
        raise ValueError(f"q_offset={q_offset!r}; expected an int >= 0")
    if seq_len is not None and (not _is_int(seq_len) or seq_len < 1):
        raise ValueError(f"seq_len={seq_len!r}; expected None or an int >= 1")
    total = q_offset + sq
    if total > sk:
        raise ValueError(
            f"q_offset + Sq = {q_offset} + {sq} > Sk = {sk}; every query row must also be a key "
            "(keys 0..Sk-1 include the queries, as in a KV cache)"
        )
    if doc_ids is None:
        q_pos = torch.arange(q_offset, total, device=device)
        k_pos = torch.arange(sk, device=device)
        q_doc = k_doc = None
        lengths = torch.full((sq,), total, dtype=torch.int64, device=device)
    else:
        if tuple(doc_ids.shape) != (batch, sk) or doc_ids.dtype.is_floating_point:
            raise ValueError(
                f"doc_ids shape={tuple(doc_ids.shape)} dtype={doc_ids.dtype}; expected an int "
                f"tensor [B, Sk] = [{batch}, {sk}]"
            )
        run_ids, pos, lens = doc_runs(doc_ids.to(device), limit=total)
        q_pos, k_pos = pos[:, q_offset:total], pos
        q_doc, k_doc = run_ids[:, q_offset:total], run_ids
        lengths = lens[:, q_offset:total]
    if seq_len is not None:
        lengths = torch.full_like(lengths, seq_len)
    temperature = dca_temperature(lengths, original_max_position_embeddings)
    return q_pos, k_pos, q_doc, k_doc, temperature
