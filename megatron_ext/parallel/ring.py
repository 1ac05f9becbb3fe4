"""Ring context parallelism on an injected block function, with an exact backward.

K and V travel around the ring (``RingComm``: batched isend/irecv, the next transfer posted
before the current block is computed, so they overlap). At step t rank r holds the shard of rank
(r - t) mod P and attends its queries to it with the block function; the partial (out, lse)
are merged in fp32 by ``merge_attn_outputs`` (docs/methods/conventions.md). A step whose block
shows no visible key (e.g. a later shard under a causal mask) is skipped in both directions.

Backward (form 1 of "Backward of the merge" in docs/methods/conventions.md, with
recomputation): K and V go around the ring again; each step recomputes its block's
(out_t, lse_t) with autograd and back-propagates

    dout_t = w_t * dout,   dlse_t = w_t * (<dout, out_t - out> + dlse),   w_t = exp(lse_t - lse)

through the block function, which gives that block's exact share of dq, dk, dv for *any*
differentiable block function (plain, windowed, chunked, CoCA, DCA). dK and dV accumulate in
fp32 in a buffer that travels with the shard and reaches its owner after P hops. Memory stays
at one remote shard (plus its gradient buffer) per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.ops import merge_attn_outputs
from megatron_ext.ops.meta import Meta
from megatron_ext.ops.method import BlockFn
from megatron_ext.parallel.comm import RingComm

__all__ = ["ring_attention"]

_KV_TAG, _DKV_TAG = 1, 2


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _block_grads(block, q, k, v, qm, km, out, lse, dout, dlse):
    """Exact share of (dq, dk, dv) of one key block, given the merged out and lse."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        o_t, l_t = block(*leaves, qm, km)
        finite = torch.isfinite(l_t) & torch.isfinite(lse)
        w = torch.where(finite, torch.exp(l_t.detach() - torch.where(finite, lse, 0)), 0)
        w_row = w.transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
        dot = (dout * (o_t.detach().to(out.dtype) - out)).sum(-1).transpose(1, 2)  # [B, H, S]
        d_out = (w_row * dout).to(o_t.dtype)
        d_lse = (w * (dot + (0 if dlse is None else dlse))).to(l_t.dtype)
        # <d_out, o_t> + <d_lse, l_t> has exactly these output gradients (and, unlike passing
        # grad_outputs, does not make torch import its symbolic-shape machinery).
        live = torch.isfinite(l_t)
        surrogate = (o_t * d_out).sum() + (torch.where(live, l_t, 0) * d_lse).sum()
        grads = torch.autograd.grad(surrogate, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k, v))]


class _RingAttnFunc(torch.autograd.Function):
    """forward: ring pass of K/V with merged partials; backward: ring pass of K/V and dK/dV."""

    @staticmethod
    def forward(ctx, q, k, v, block, q_meta, metas, comm, known_live):
        P, rank = comm.world_size, comm.rank
        kv = torch.stack((k, v))
        out = lse = None
        live = []
        for t in range(P):
            nxt = comm.send_recv(kv, key="ring.fwd", tag=_KV_TAG) if t + 1 < P else None
            if known_live is not None and not known_live[t]:  # planned: no key visible
                live.append(False)
                if nxt is not None:
                    kv = comm.wait(nxt)
                continue
            o_t, l_t = block(q, kv[0], kv[1], q_meta, metas[(rank - t) % P])
            live.append(True if known_live is not None else bool(torch.isfinite(l_t).any()))
            if live[-1]:
                acc = _acc_dtype(q)
                o_t, l_t = o_t.to(acc), l_t.to(acc)
                out, lse = (o_t, l_t) if out is None else merge_attn_outputs([out, o_t], [lse, l_t])
            if nxt is not None:
                kv = comm.wait(nxt)
        if out is None:  # no query sees any key
            B, S, H, _ = q.shape
            out = torch.zeros(q.shape, dtype=_acc_dtype(q), device=q.device)
            lse = torch.full((B, H, S), float("-inf"), dtype=out.dtype, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block, ctx.q_meta, ctx.metas, ctx.comm, ctx.live = block, q_meta, metas, comm, live
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        comm, P, rank = ctx.comm, ctx.comm.world_size, ctx.comm.rank
        acc = out.dtype
        dout = torch.zeros_like(out) if dout is None else dout.to(acc)
        dlse = None if dlse is None else dlse.to(acc)
        kv = torch.stack((k, v))
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        pending_dkv = None
        for t in range(P):
            nxt = comm.send_recv(kv, key="ring.bwd", tag=_KV_TAG) if t + 1 < P else None
            if ctx.live[t]:
                km = ctx.metas[(rank - t) % P]
                gq, gk, gv = _block_grads(
                    ctx.block, q, kv[0], kv[1], ctx.q_meta, km, out, lse, dout, dlse
                )
                dq += gq
                g_kv = torch.stack((gk, gv)).to(acc)
            else:
                g_kv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            # The shard's dK/dV buffer arrives from the previous rank (started at its owner).
            dkv = g_kv if pending_dkv is None else comm.wait(pending_dkv) + g_kv
            pending_dkv = comm.send_recv(dkv, key="ring.bwd", tag=_DKV_TAG) if P > 1 else None
            if nxt is not None:
                kv = comm.wait(nxt)
        dkv = dkv if pending_dkv is None else comm.wait(pending_dkv)  # home after P hops
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: BlockFn,
    metas: list[Meta],
    group: dist.ProcessGroup | None,
    *,
    live: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention of this rank's queries against every rank's K/V shard.

    Args:
        q: local queries [B, L, H, D] (whatever the block function takes as queries).
        k, v: local keys and values [B, L, Hkv, D] (already transformed by their owner).
        block: block function (q, k, v, q_meta, k_meta) -> fp32 (out, lse).
        metas: every rank's Meta, in rank order.
        group: the context-parallel process group.
        live: per ring step t, whether any query here sees any key of rank (rank - t) mod P
            (planned once per batch from the metadata); None = find out from each block's lse,
            which reads a device value per step.

    Returns:
        out [B, L, H, D] in q's dtype and lse [B, H, L] (fp32; fp64 for fp64), differentiable.
    """
    comm = RingComm(group)
    if live is not None and len(live) != comm.world_size:
        raise ValueError(f"live has {len(live)} entries; the ring has {comm.world_size} steps")
    return _RingAttnFunc.apply(q, k, v, block, metas[comm.rank], metas, comm, live)
