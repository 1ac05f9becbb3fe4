"""``cp_attn_func``: context-parallel attention at op level, for every variant and plan.

Takes this rank's shards of q, k, v (laid out by ``sharding``), runs the variant's owner-side
prologue (DCA key rotation, CoCA K'/Q'), then one plan:

==========  =================================================  ==============================
plan        communication                                      variants
==========  =================================================  ==============================
ring        K/V passed around the ring, overlapped (ring.py)   all
allgather   one all-gather of K/V (allgather.py)               all
a2a         head scatter, Ulysses (ulysses.py)                 all (head counts permitting)
halo        only the keys a window / chunk reaches (halo.py)   window, chunked
local       none; refuses if a key would have to travel        window, chunked
==========  =================================================  ==============================

``plan=None`` picks ring for plain, DCA and CoCA and halo for window and chunked layers (halo
sends nothing when chunks align with shards). A plan that cannot honour the variant's mask
raises ValueError naming both; nothing ever falls back silently. All partial outputs and lse
are merged in fp32 (fp64 for fp64 inputs). See docs/context_parallel.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.parallel.allgather import allgather_attention
from megatron_ext.parallel.halo import halo_attention
from megatron_ext.parallel.methods import layout_meta, make_method
from megatron_ext.parallel.ring import ring_attention
from megatron_ext.parallel.sharding import CPLayout, resolve_layout
from megatron_ext.parallel.ulysses import ulysses_attention

__all__ = ["PLANS", "cp_attn_func"]

PLANS = ("ring", "allgather", "a2a", "halo", "local")


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


def cp_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    attn: str,
    plan: str | None = None,
    layout: str | CPLayout = "zigzag",
    return_lse: bool = False,
    **attn_kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel attention of this rank's shards; equals the single-process op.

    Masks use the tokens' absolute per-document positions and documents carried by the
    layout (never local indices). Causal: key j is visible to query i when pos_j <= pos_i in
    the same document; padding tokens of the layout are never visible.

    Args:
        q: this rank's queries [B, L, H, D] (un-rotated for "dca" and "coca", which rotate
            themselves; already rotated, or NoPE, for the others).
        k: this rank's keys [B, L, Hkv, D] (un-rotated for "dca"; the raw ``t_proj`` output
            t for "coca"); H % Hkv == 0.
        v: this rank's values [B, L, Hkv, D].
        group: the context-parallel process group (None = default group).
        attn: "plain", "window", "chunked", "dca" or "coca".
        plan: "ring", "allgather", "a2a", "halo", "local" or None (the variant's default).
        layout: "contiguous" / "zigzag" for unpadded single-document rows of length P * L, or
            the CPLayout the shards were made with (``make_layout``; packed or padded rows).
        return_lse: also return the lse.
        **attn_kwargs: the single-process op's keyword arguments:
            plain: causal=True, softmax_scale (``attention_func``);
            window: window (W, keys i - W < j <= i), softmax_scale;
            chunked: chunk (c), softmax_scale;
            dca: chunk_size, local_size, theta, softmax_scale,
            original_max_position_embeddings, seq_len (``dual_chunk_attn_func``);
            coca: form, theta, causal, softmax_scale, rope_scaling, rotary_dim
            (``coca_attn_func``).

    Returns:
        out [B, L, H, D] in q's dtype; with return_lse also lse [B, H, L] (fp32, fp64 for fp64
        inputs). Differentiable w.r.t. q, k, v.

    Raises:
        ValueError: unknown attn / plan / keyword, a plan that cannot honour the mask, head
            counts a2a cannot split, shards that do not match the layout.
    """
    method = make_method(attn, attn_kwargs)
    _check_shapes(q, k, v)
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    lay = resolve_layout(layout, world_size=P, local_len=q.shape[1])
    plan = method.default_plan if plan is None else plan
    if plan not in PLANS:
        raise ValueError(f"plan={plan!r}; expected one of {PLANS} or None")
    if plan not in method.plans:
        raise ValueError(
            f"plan={plan!r} cannot honour attn={attn!r}: {method.refusal}; plans that can: "
            f"{method.plans}"
        )
    B = q.shape[0]
    metas = [layout_meta(lay, r, B) for r in range(P)]
    q, k, v = method.prologue(q, k, v, metas[rank], lay)
    lse = None
    if plan == "ring":
        out, lse = ring_attention(q, k, v, method.block, metas, group)
    elif plan == "allgather":
        out, lse = allgather_attention(q, k, v, method.block, metas, group)
    elif plan == "a2a":
        out, lse = ulysses_attention(q, k, v, method.block, metas, group, return_lse=return_lse)
    else:
        what = f"attn={attn!r} with window={method.window}, chunk={method.chunk}"
        out, lse = halo_attention(
            q, k, v, method.block, metas, group, window=method.window, chunk=method.chunk,
            local=plan == "local", what=what,
        )  # fmt: skip
    out = out.to(v.dtype)
    return (out, lse) if return_lse else out
