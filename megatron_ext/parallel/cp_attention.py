"""Context parallelism applied from outside to any attention method.

``ContextParallel(method, group, plan)`` wraps a method object (``RopeAttention``,
``CoCAAttention``, ``DualChunkAttention``; see ``ops/method.py``) and runs it on this rank's
shard with the same call a layer makes on one process (``run(q, k, v, batch)``): each owner runs
the method's prologue (RoPE, DCA's key rotation, CoCA's K' / Q') on its own tokens, then one
plan moves keys and calls the method's block function:

==========  =================================================  ==============================
plan        communication                                      methods
==========  =================================================  ==============================
ring        K/V passed around the ring, overlapped (ring.py)   all
allgather   one all-gather of K/V (allgather.py)               all
a2a         head scatter, Ulysses (ulysses.py)                 all (head counts permitting)
halo        only the keys a window / chunk reaches (halo.py)   window, chunked
local       none; refuses if a key would have to travel        window, chunked
==========  =================================================  ==============================

``plan=None`` takes the method's default (ring; halo for window / chunked layers). A plan that
cannot honour the method's mask raises ValueError naming both; nothing falls back silently.

Everything that depends only on the batch's layout is made once per batch (``cp_batch``): every
rank's token metadata, the dynamic-NTK length of the global batch, and, cached in the batch on
first use, which ring steps see any key and the halo exchange plan. So layers after the first
do no host-side planning, and the ring never reads a device value to decide what to skip.
``cp_attn_func`` is the functional form. See docs/context_parallel.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.ops.meta import Meta, rope_length
from megatron_ext.ops.method import AttentionMethod, BatchMeta
from megatron_ext.parallel.allgather import allgather_attention
from megatron_ext.parallel.halo import check_local, halo_attention, halo_plan
from megatron_ext.parallel.ring import ring_attention
from megatron_ext.parallel.sharding import CPLayout, resolve_layout
from megatron_ext.parallel.ulysses import ulysses_attention

__all__ = ["PLANS", "ContextParallel", "cp_attn_func", "cp_batch", "layout_meta"]

PLANS = ("ring", "allgather", "a2a", "halo", "local")


def layout_meta(layout: CPLayout, rank: int, batch: int, seq_len: int | None = None) -> Meta:
    """Metadata of rank ``rank``'s shard, expanded to ``batch`` rows.

    ``seq_len`` fixes the length of length rules (DCA temperature) for every real token.
    """
    if layout.index.shape[1] not in (1, batch):
        raise ValueError(f"layout has {layout.index.shape[1]} rows; the batch has {batch}")
    rows = lambda x: x[rank].expand(batch, -1) if x.shape[1] == 1 else x[rank]  # noqa: E731
    pos, doc, lengths = rows(layout.positions), rows(layout.doc_ids), rows(layout.doc_lengths)
    if seq_len is not None:
        lengths = torch.where(pos >= 0, seq_len, 0)
    return Meta(pos, doc, lengths)


def cp_batch(
    layout: CPLayout, rank: int, batch: int, *, seq_len: int | None = None
) -> BatchMeta:
    """Per-batch metadata of a context-parallel batch (made once, shared by every layer).

    Args:
        layout: where every token of the global batch lives (``make_layout`` /
            ``parallel.batch.cp_shard_batch``).
        rank: this rank's index in the context-parallel group.
        batch: B, rows of the batch.
        seq_len: fixed length for length rules (dynamic NTK, DCA temperature); None = the
            global batch's (largest position + 1; each document's length).
    """
    metas = tuple(layout_meta(layout, r, batch, seq_len) for r in range(layout.world_size))
    return BatchMeta(metas[rank], rope_length([layout.positions], seq_len), metas, rank)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}={got}; expected a float tensor [B, L, heads, D]")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}; "
            "expected local shards q [B, L, H, D] and k, v [B, L, Hkv, D]"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"H={q.shape[2]}, Hkv={k.shape[2]}; expected H % Hkv == 0")


def _mask_key(method: AttentionMethod) -> tuple:
    return (method.causal, method.window, method.chunk)


class ContextParallel:
    """``method`` run context parallel over ``group`` with ``plan``.

    Args:
        method: the attention method (its prologue and block function).
        group: the context-parallel process group (None = the default group).
        plan: one of ``PLANS`` the method can honour, or None for its default.
        plan_key: the config key that chose the plan, named in refusals.
    """

    def __init__(
        self,
        method: AttentionMethod,
        group: dist.ProcessGroup | None,
        plan: str | None = None,
        *,
        plan_key: str = "plan",
    ) -> None:
        plan = method.default_plan if plan is None else plan
        if plan not in PLANS:
            raise ValueError(f"{plan_key}={plan!r}; expected one of {PLANS}")
        if plan not in method.plans:
            raise ValueError(
                f"{plan_key}={plan!r} cannot honour {method.name} attention: {method.refusal}; "
                f"plans that can: {method.plans}"
            )
        self.method, self.group, self.plan = method, group, plan

    def _ring_live(self, batch: BatchMeta) -> list[bool]:
        key = ("ring_live", _mask_key(self.method))
        if key not in batch.cache:
            metas, r, P = batch.metas, batch.rank, len(batch.metas)
            batch.cache[key] = [self.method.sees_any(metas[r], metas[(r - t) % P])
                                for t in range(P)]
        return batch.cache[key]

    def _halo(self, batch: BatchMeta):
        m = self.method
        key = ("halo", self.plan, m.window, m.chunk)
        if key not in batch.cache:
            if self.plan == "local":
                what = f"{m.name} attention with window={m.window}, chunk={m.chunk}"
                check_local(list(batch.metas), window=m.window, chunk=m.chunk, what=what)
                batch.cache[key] = ()  # checked: nothing travels
            else:
                batch.cache[key] = halo_plan(list(batch.metas), batch.rank, window=m.window,
                                             chunk=m.chunk)
        return batch.cache[key]

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: BatchMeta,
        *,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of this rank's shard; equals the method on the whole batch.

        Args:
            q: this rank's raw queries [B, L, H, D]; k, v: raw keys / values [B, L, Hkv, D]
                (for CoCA, k is the ``t_proj`` output): the method prepares them.
            batch: ``cp_batch`` of the global batch.
            return_lse: also return the lse [B, H, L] (fp32; fp64 for fp64 inputs).

        Returns:
            out [B, L, H, D] in v's dtype (and the lse).
        """
        _check_shapes(q, k, v)
        P, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if batch.metas is None or len(batch.metas) != P or batch.rank != rank:
            raise ValueError(
                f"the batch metadata is for {None if batch.metas is None else len(batch.metas)} "
                f"ranks (rank {batch.rank}); this group has {P} (rank {rank}): build it with "
                "cp_batch(layout, rank, batch)"
            )
        if batch.meta.positions.shape != q.shape[:2]:
            raise ValueError(
                f"local shards of length {q.shape[1]} (batch {q.shape[0]}) do not match the "
                f"layout's {tuple(batch.meta.positions.shape)}"
            )
        method, metas, rope_len = self.method, list(batch.metas), batch.rope_len
        q = method.prepare_q(q, batch.meta, rope_len)
        k, v = method.prepare_kv(k, v, batch.meta, rope_len)

        def block(q, k, v, qm, km):
            return method.block(q, k, v, qm, km, rope_len)

        lse = None
        if self.plan == "ring":
            out, lse = ring_attention(q, k, v, block, metas, self.group,
                                      live=self._ring_live(batch))
        elif self.plan == "allgather":
            out, lse = allgather_attention(q, k, v, block, metas, self.group)
        elif self.plan == "a2a":
            out, lse = ulysses_attention(q, k, v, block, metas, self.group,
                                         return_lse=return_lse)
        else:
            out, lse = halo_attention(q, k, v, block, metas, self.group, window=method.window,
                                      chunk=method.chunk, plan=self._halo(batch),
                                      local=self.plan == "local")
        out = out.to(v.dtype)
        return (out, lse) if return_lse else out


def cp_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: AttentionMethod,
    group: dist.ProcessGroup | None,
    layout: str | CPLayout = "zigzag",
    plan: str | None = None,
    seq_len: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel ``method`` on this rank's shards; equals the method on one process.

    Masks use the tokens' absolute per-document positions and documents carried by the layout
    (never local indices); padding tokens of the layout are never visible.

    Args:
        q, k, v: this rank's raw shards [B, L, H, D] / [B, L, Hkv, D].
        method: the attention method object.
        group: the context-parallel process group (None = default group).
        layout: "contiguous" / "zigzag" for unpadded single-document rows of length P * L, or
            the CPLayout the shards were made with (packed or padded rows).
        plan: one of ``PLANS`` or None (the method's default).
        seq_len: fixed length for length rules; None = the global batch's.
        return_lse: also return the lse.

    Returns:
        out [B, L, H, D] in v's dtype (and lse [B, H, L], fp32; fp64 for fp64 inputs).
    """
    _check_shapes(q, k, v)
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    lay = resolve_layout(layout, world_size=P, local_len=q.shape[1])
    batch = cp_batch(lay, rank, q.shape[0], seq_len=seq_len)
    return ContextParallel(method, group, plan).run(q, k, v, batch, return_lse=return_lse)
