"""Halo context parallelism for sliding-window and chunked-local layers ("halo" and "local").

A query at per-document position i of a window-W layer needs the keys (i - W, i] of its
document; under a chunked-local layer, the keys of its chunk up to i. A shard therefore needs
from other ranks only the keys just before each of its slices (docs/context_parallel.md, "halo"):
contiguous, the last W - 1 keys of rank r - 1 (more ranks when a slice is shorter than W - 1);
zigzag, the tail of slice r - 1 (rank r - 1) and of slice 2P - 2 - r (rank r + 1). The volume
is at most (W - 1) keys per slice start, independent of the sequence length.

Which keys travel is computed exactly, not assumed: every rank derives, from the global layout
(identical on all ranks), the keys of each other rank that some of its queries can see
(``needed_keys``) and the keys of its own that each other rank needs. Then one batched
point-to-point exchange (``halo_exchange``: forward sends K/V rows, backward returns their
dK/dV to the owner) and one block call against local + received keys.

"local" is the same plan with the promise that nothing needs to travel (chunked layers whose
chunks lie inside shards: contiguous (N/P) % c == 0, zigzag (N/2P) % c == 0). If any key is
needed from another rank, it raises ValueError naming the first such pair; it never drops keys.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.ops import block_key_ranges
from megatron_ext.ops.meta import Meta, cat_meta
from megatron_ext.ops.method import BlockFn
from megatron_ext.parallel.comm import halo_exchange

__all__ = ["check_local", "halo_attention", "halo_plan", "needed_keys"]


def needed_keys(q_meta: Meta, k_meta: Meta, *, window: int | None, chunk: int | None):
    """bool [B, n_k]: keys of ``k_meta`` visible to at least one query of ``q_meta``.

    Causal masks with the given window / chunk, same document, padding never visible.
    """
    order, lo, hi = block_key_ranges(
        q_meta.positions, k_meta.positions, q_doc_ids=q_meta.doc_ids, k_doc_ids=k_meta.doc_ids,
        causal=True, window=window, chunk=chunk,
    )  # fmt: skip
    B, nk = lo.shape[0], k_meta.positions.shape[1]
    live = (hi > lo).long()
    diff = torch.zeros(B, nk + 1, dtype=torch.int64)
    diff.scatter_add_(1, lo, live)
    diff.scatter_add_(1, hi, -live)
    covered = diff.cumsum(1)[:, :nk] > 0  # over the ordered keys
    if order is None:
        return covered
    return torch.zeros_like(covered).scatter_(1, order, covered)


def halo_plan(metas: list[Meta], rank: int, *, window: int | None, chunk: int | None):
    """This rank's exchange: (send, recv, recv_rows, recv_meta).

    send: peer -> flat indices (b * L + slot) of own keys the peer needs; recv: peer -> count;
    recv_rows: int64 [n] batch row of each received key (peer order, then row-major);
    recv_meta: Meta [1, n] of the received keys.
    """
    L = metas[rank].positions.shape[1]
    send, recv, rows, parts = {}, {}, [], []
    for peer in range(len(metas)):
        if peer == rank:
            continue
        mine = needed_keys(metas[peer], metas[rank], window=window, chunk=chunk)
        if bool(mine.any()):
            b, s = mine.nonzero(as_tuple=True)
            send[peer] = b * L + s
        theirs = needed_keys(metas[rank], metas[peer], window=window, chunk=chunk)
        if bool(theirs.any()):
            b, s = theirs.nonzero(as_tuple=True)
            recv[peer] = int(b.numel())
            rows.append(b)
            parts.append(Meta(*(x[b, s][None] for x in metas[peer])))
    empty = Meta(*(torch.zeros(1, 0, dtype=torch.int64) for _ in range(3)))
    recv_meta = cat_meta(parts) if parts else empty
    recv_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    return send, recv, recv_rows, recv_meta


def check_local(metas: list[Meta], *, window: int | None, chunk: int | None, what: str) -> None:
    """Raise ValueError unless no rank needs a key held by another rank (same on all ranks)."""
    for r in range(len(metas)):
        for s in range(len(metas)):
            if r == s:
                continue
            n = int(needed_keys(metas[r], metas[s], window=window, chunk=chunk).sum())
            if n:
                raise ValueError(
                    f"plan='local' cannot honour {what}: rank {r} needs {n} keys held by rank "
                    f"{s} (attention chunks or windows cross shard boundaries; chunked layers "
                    "need (N/P) % chunk == 0 contiguous or (N/2P) % chunk == 0 zigzag per "
                    "document); use plan='halo'"
                )


def _place(got: torch.Tensor, rows: torch.Tensor, meta: Meta, batch: int):
    """Received rows [n, ...] -> per-batch-row extension [B, E, ...] and its Meta [B, E]."""
    if rows.numel() == 0:
        empty = torch.zeros(batch, 0, dtype=torch.int64)
        return got.reshape(batch, 0, *got.shape[1:]), Meta(empty, empty, empty)
    counts = torch.bincount(rows, minlength=batch)
    E = int(counts.max())
    slot = torch.arange(rows.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    order = torch.argsort(rows, stable=True)  # received order is peer-major; group by row
    rows_sorted = rows[order]
    ext = got.new_zeros(batch, E, *got.shape[1:])
    ext = ext.index_put(
        (rows_sorted.to(got.device), slot.to(got.device)), got[order.to(got.device)]
    )
    pad = torch.full((batch, E), -1, dtype=torch.int64)
    fields = [pad.clone(), pad.clone().clamp(min=0), pad.clone().clamp(min=0)]
    for f, src in zip(fields, meta):
        f[rows_sorted, slot] = src[0, order]
    return ext, Meta(*fields)


def halo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: BlockFn,
    metas: list[Meta],
    group: dist.ProcessGroup | None,
    *,
    window: int | None,
    chunk: int | None,
    local: bool = False,
    what: str = "",
    plan: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed / chunked attention with a halo exchange (or none, for ``local``).

    Args:
        q: local queries [B, L, H, D]; k, v: local keys and values [B, L, Hkv, D].
        block: block function (q, k, v, q_meta, k_meta) -> fp32 (out, lse).
        metas: every rank's Meta, in rank order.
        group: the context-parallel process group.
        window, chunk: the layer's mask (one or both).
        local: refuse (ValueError) instead of exchanging when any key must travel.
        what: description of the mask for error messages.
        plan: ``halo_plan``'s result made earlier for the same metadata (then neither the plan
            nor, for ``local``, the check is redone); None = make it here.

    Returns:
        out [B, L, H, D] (fp32, fp64 for fp64) and lse [B, H, L], differentiable.
    """
    rank = dist.get_rank(group)
    if local:
        if plan is None:
            check_local(metas, window=window, chunk=chunk, what=what)
        return block(q, k, v, metas[rank], metas[rank])
    if plan is None:
        plan = halo_plan(metas, rank, window=window, chunk=chunk)
    send, recv, rows, recv_meta = plan
    B, L = k.shape[:2]
    kv = torch.stack((k, v), 2)  # [B, L, 2, Hkv, D]
    send = {p: idx.to(k.device) for p, idx in send.items()}
    got = halo_exchange(kv.flatten(0, 1), send, recv, group)  # [n, 2, Hkv, D]
    # Even an empty halo joins the graph, so this rank's backward returns the dK/dV it owes
    # to the ranks it sent keys to.
    ext, ext_meta = _place(got, rows, recv_meta, B)
    kv = torch.cat((kv, ext), 1)
    return block(q, kv[:, :, 0], kv[:, :, 1], metas[rank], cat_meta([metas[rank], ext_meta]))
