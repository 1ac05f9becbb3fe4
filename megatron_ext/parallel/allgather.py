"""All-gather context parallelism: every rank gathers all K/V shards and attends once.

The simplest exact plan: one all-gather of the stacked (K, V) shards (``all_gather_cp``,
forward: all-gather, backward: reduce-scatter of dK/dV to the owners in fp32), then one call of
the block function of this rank's queries against the whole sequence in rank order (the block
function orders keys by (document, position) itself). Memory holds the whole K/V; volume per
rank is (P-1) shards of K and V forward and (P-1) shards of dK and dV backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.ops.meta import Meta, cat_meta
from megatron_ext.ops.method import BlockFn
from megatron_ext.parallel.comm import all_gather_cp

__all__ = ["allgather_attention"]


def allgather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: BlockFn,
    metas: list[Meta],
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's queries against the all-gathered K/V.

    Args:
        q: local queries [B, L, H, D].
        k, v: local keys and values [B, L, Hkv, D] (already transformed by their owner).
        block: block function (q, k, v, q_meta, k_meta) -> fp32 (out, lse).
        metas: every rank's Meta, in rank order.
        group: the context-parallel process group.

    Returns:
        out [B, L, H, D] (fp32, fp64 for fp64) and lse [B, H, L], differentiable.
    """
    rank = dist.get_rank(group)
    kv = all_gather_cp(torch.stack((k, v)), group, key="allgather")  # [P, 2, B, L, Hkv, D]
    kv = kv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # [2, B, P*L, Hkv, D], rank order
    return block(q, kv[0], kv[1], metas[rank], cat_meta(metas))
