"""All-to-all (Ulysses) context parallelism: scatter heads, attend whole sequences, gather back.

Each rank trades its sequence shard of every head for the whole sequence of H/P query heads
(one all-to-all each for Q, the stacked K/V and the output; ``all_to_all_cp`` is its own
adjoint, so the backward is the same exchanges in reverse). The sequence arrives in rank order;
the block function orders keys by (document, position) itself, so any method runs unchanged.

Heads: H % P == 0 is required. KV heads are split when Hkv % P == 0; when P % Hkv == 0 (more
ranks than KV heads) each KV head is replicated P / Hkv times so every rank receives the KV
head its query heads read (GQA: query head h reads KV head h // (H / Hkv)); any other head
count cannot be split and raises ValueError.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.ops.meta import Meta, cat_meta
from megatron_ext.ops.method import BlockFn
from megatron_ext.parallel.comm import all_to_all_cp

__all__ = ["check_heads", "ulysses_attention"]


def check_heads(H: int, Hkv: int, world_size: int) -> int:
    """KV-head replication factor for the all-to-all plan (1 = plain split); ValueError if none."""
    P = world_size
    if H % P:
        raise ValueError(
            f"plan='a2a' scatters query heads over the CP ranks: H={H} is not divisible by "
            f"CP={P}; use plan='ring' or 'allgather', or a CP size dividing H"
        )
    if Hkv % P == 0:
        return 1
    if P % Hkv == 0:
        return P // Hkv
    raise ValueError(
        f"plan='a2a' cannot split Hkv={Hkv} KV heads over CP={P} ranks: needs Hkv % CP == 0 "
        "or CP % Hkv == 0 (then KV heads are replicated); use plan='ring' or 'allgather'"
    )


def _seq_to_heads(x: torch.Tensor, P: int, group) -> torch.Tensor:
    """[B, L, H, D] local sequence, all heads -> [B, P*L, H/P, D] whole sequence, own heads."""
    B, L, H, D = x.shape
    x = x.reshape(B, L, P, H // P, D).permute(2, 0, 1, 3, 4)  # [P (dest), B, L, H/P, D]
    y = all_to_all_cp(x, group, key="a2a")  # [P (source), B, L, H/P, D]
    return y.permute(1, 0, 2, 3, 4).reshape(B, P * L, H // P, D)


def _heads_to_seq(y: torch.Tensor, P: int, group) -> torch.Tensor:
    """Inverse of ``_seq_to_heads``: [B, P*L, H/P, D] -> [B, L, H, D]."""
    B, PL, h, D = y.shape
    y = y.reshape(B, P, PL // P, h, D).permute(1, 0, 2, 3, 4)  # [P (dest), B, L, h, D]
    x = all_to_all_cp(y, group, key="a2a")  # [P (head group), B, L, h, D]
    return x.permute(1, 2, 0, 3, 4).reshape(B, PL // P, P * h, D)


def _lse_to_seq(lse: torch.Tensor, P: int, group) -> torch.Tensor:
    """[B, H/P, P*L] -> [B, H, L]."""
    B, h, PL = lse.shape
    x = lse.reshape(B, h, P, PL // P).permute(2, 0, 1, 3)  # [P (dest), B, h, L]
    y = all_to_all_cp(x, group, key="a2a")
    return y.permute(1, 0, 2, 3).reshape(B, P * h, PL // P)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: BlockFn,
    metas: list[Meta],
    group: dist.ProcessGroup | None,
    *,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head-scatter attention.

    Args:
        q: local queries [B, L, H, D].
        k, v: local keys and values [B, L, Hkv, D] (already transformed by their owner).
        block: block function (q, k, v, q_meta, k_meta) -> fp32 (out, lse).
        metas: every rank's Meta, in rank order.
        group: the context-parallel process group.
        return_lse: also bring the lse back (one more all-to-all).

    Returns:
        out [B, L, H, D] in q's dtype and lse [B, H, L] (fp32; None unless return_lse).
    """
    P = dist.get_world_size(group)
    rep = check_heads(q.shape[2], k.shape[2], P)
    kv = torch.stack((k, v), 3)  # [B, L, Hkv, 2, D]: K and V of a head travel together
    if rep > 1:
        kv = kv.repeat_interleave(rep, dim=2)  # slot r holds KV head r // rep
    q_h = _seq_to_heads(q, P, group)
    kv_h = _seq_to_heads(kv.flatten(2, 3), P, group).unflatten(2, (-1, 2))
    meta = cat_meta(metas)
    out, lse = block(q_h, kv_h[:, :, :, 0], kv_h[:, :, :, 1], meta, meta)
    out = _heads_to_seq(out.to(q.dtype), P, group)
    return out, (_lse_to_seq(lse, P, group) if return_lse else None)
