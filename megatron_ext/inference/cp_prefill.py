"""Context-parallel prefill: the prompt sharded over the CP group, the cache filled on every rank.

A model built with ``cp`` > 1 (``load_model(..., context_parallel=N)``) prefills a prompt the
way training runs a batch: each prefill step's columns are split over the N ranks with the
run's layout (``parallel.cp_layout``: zigzag or contiguous, exact for any length, padding
masked), and every layer runs its own context-parallel attention (the ``ContextParallel`` plan
its core attention was built with: ring / allgather / a2a from ``parallel.cp_algorithm``, halo
for sliding-window and chunked-local layers). Per layer and step

1. the CP attention of this rank's queries against the step's keys (out, lse);
2. the same prepared queries against the prompt before the step, already in this rank's cache
   (``attend_cached``), merged exactly by log-sum-exp (the first step has no such part);
3. this rank prepares its keys (RoPE, DCA's ``j mod C`` rotation, CoCA's K', ...) once, the
   prepared keys and values are all-gathered over the group and every rank writes all of them
   into its cache at their positions (``store``: full caches keep every position, rings the
   last W or c).

After prefill every rank holds the same cache as a one-process prefill, so decode runs on every
rank without communication (the sampled token is broadcast from the group's first rank so that
ranks never diverge). Memory: each rank holds the whole cache (the same bytes as one process);
what CP divides is the prefill's activations and attention work. The step's all-gather is
transient, one layer at a time. LongHeads (chunk summaries and selection) has no sharded
prefill and is refused. Design notes: docs/inference.md, "Context-parallel prefill".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_ext.ops import BatchMeta, merge_attn_outputs
from megatron_ext.parallel import LAYOUTS, CPLayout, layout_meta, make_layout, shard_tensor
from megatron_ext.parallel.comm import gather_from_cp
from megatron_ext.parallel.sharding import unshard_tensors

if TYPE_CHECKING:
    from megatron_ext.inference.forward import CachedModel

__all__ = ["broadcast_tokens", "check_cp_prefill", "cp_logits", "cp_prefill_step",
           "prompt_layout"]

CP_METHODS = ("rope", "nope", "hybrid", "dca", "coca")


def check_cp_prefill(variant: str, layout: str, cp_size: int) -> None:
    """Refuse what context-parallel prefill cannot run, naming it and what works."""
    if variant not in CP_METHODS:
        raise ValueError(
            f"attention.variant={variant!r} has no context-parallel prefill (context_parallel="
            f"{cp_size}): its chunk summaries and chunk selection are not sharded over ranks; "
            f"run it with context_parallel=1, or use one of {', '.join(CP_METHODS)} under "
            "context parallelism")
    if layout not in LAYOUTS:
        raise ValueError(f"parallel.cp_layout={layout!r}; expected one of {LAYOUTS}")


def prompt_layout(
    kind: str,
    counts: torch.Tensor,
    world_size: int,
    *,
    width: int,
    start: int = 0,
    lengths: torch.Tensor | None = None,
) -> CPLayout:
    """The layout of one prefill step of B right-padded prompt rows over ``world_size`` ranks.

    Row b holds one document: its first ``counts[b]`` columns of a [B, width] block, at
    positions ``start .. start + counts[b] - 1`` (a row may have none); the rest is padding,
    never visible. Each row is split on its own (``make_layout``), padded exactly to the
    longest row's local length.

    Args:
        kind: "zigzag" or "contiguous". counts: int [B], real columns per row (<= width).
        world_size: P. width: columns of the block. start: position of column 0.
        lengths: int [B], each row's length for length rules (the DCA temperature); default
            ``start + counts``.

    Returns:
        A CPLayout with per-row tables [P, B, L] (``index`` is the column in the block).
    """
    n = [int(c) for c in counts]
    if any(c < 0 or c > width for c in n):
        raise ValueError(f"counts={n}; expected each in 0..width={width}")
    lens = [start + c for c in n] if lengths is None else [int(x) for x in lengths]
    rows = [make_layout(kind, c, world_size) if c else None for c in n]
    L = max((lay.local_len for lay in rows if lay is not None), default=1)
    shape = (world_size, len(n), L)
    index = torch.full(shape, -1, dtype=torch.int64)
    positions = torch.full(shape, -1, dtype=torch.int64)
    doc_ids = torch.ones(shape, dtype=torch.int64)  # trailing padding: a document of its own
    doc_lengths = torch.zeros(shape, dtype=torch.int64)
    for b, lay in enumerate(rows):
        if lay is None:
            continue
        m, real = lay.local_len, lay.index[:, 0] >= 0
        index[:, b, :m] = lay.index[:, 0]
        positions[:, b, :m] = torch.where(real, lay.positions[:, 0] + start, -1)
        doc_ids[:, b, :m] = lay.doc_ids[:, 0]
        doc_lengths[:, b, :m] = torch.where(real, lens[b], 0)
    return CPLayout(kind, world_size, width, index, positions, doc_ids, doc_lengths)


def _gather_keys(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's [B, L, ...] concatenated along the sequence: [B, P * L, ...]."""
    return torch.cat(gather_from_cp(x.contiguous(), group, "kv_cache").unbind(0), 1)


def cp_prefill_step(
    cm: CachedModel,
    caches: list,
    tokens: torch.Tensor,
    *,
    start: int,
    counts: torch.Tensor,
    lengths: torch.Tensor,
    rope_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prefill step of every rank of ``cm.cp_group`` (called by all of them, same inputs).

    Args:
        cm: a context-parallel cached model. caches: this rank's caches (every rank's equal).
        tokens: int [B, n], the step's prompt columns (the same on every rank).
        start: position of column 0. counts: int [B], real columns per row.
        lengths: int [B], each row's planned total length. rope_len: dynamic-NTK length.

    Returns:
        (final hidden states [L, B, hidden] of this rank's tokens, their columns in ``tokens``
        [B, L], -1 on padding). Every cache then holds the step's keys, on every rank.
    """
    group = cm.cp_group
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    B, width = tokens.shape
    lay = prompt_layout(cm.cp_layout, counts, P, width=width, start=start, lengths=lengths)
    metas = tuple(layout_meta(lay, r, B) for r in range(P))
    batch = BatchMeta(metas[rank], rope_len, metas, rank)
    qm = batch.meta
    key_pos = torch.cat([m.positions for m in metas], 1)  # the gathered keys' positions

    def attn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lm, cache = cm.layers[i], caches[i]
        out, lse = cm.cp_attend[i](q, k, v, batch, return_lse=True)
        if cache.has_keys():  # the prompt before this step: cached on every rank
            old = cache.attend_cached(lm, lm.prepare_q(q, qm, rope_len), qm, lengths, rope_len)
            out, _ = merge_attn_outputs([out, old[0]], [lse, old[1]])
        kp, vp = lm.prepare_kv(k, v, qm, rope_len)
        cache.store(_gather_keys(kp, group), _gather_keys(vp, group), key_pos)
        return out.to(v.dtype)

    local = shard_tensor(tokens, lay, rank, dim=1, pad_value=0).to(cm.device)
    h = cm.hidden(local, qm.positions, attn)
    return h, lay.index[rank]


def cp_logits(cm: CachedModel, tokens: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """One context-parallel full forward: tokens [B, S] (every rank) -> logits [B, S, vocab]
    on every rank (``gpt_forward`` on this rank's shard, then an all-gather)."""
    from megatron_ext.layers.forward import gpt_forward

    group = cm.cp_group
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    B, S = tokens.shape
    lay = make_layout(cm.cp_layout, S, P)
    local = shard_tensor(tokens, lay, rank, dim=1)
    pos = lay.positions[rank].expand(B, -1).to(tokens.device)
    out = gpt_forward(cm.model, local, positions=pos, seq_len=seq_len, cp_layout=lay)
    return unshard_tensors(gather_from_cp(out.contiguous(), group, "logits"), lay, dim=1)


def broadcast_tokens(tokens: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The group's first rank's ``tokens`` on every rank (in place)."""
    dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
    return tokens
