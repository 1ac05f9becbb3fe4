"""Per-query dense reference of LongHeads prefill: the literal reading of README.md, "The maths".

Deliberately plain and slow (Python loops over batch, heads, chunks and queries). It follows the
spec word for word and shares nothing with the fast path but ``apply_rope`` and the argument
checks: summaries are computed chunk by chunk, the selection sorts Python floats, and every
selected key is re-rotated at its re-laid slot (t-1)*w + (j mod w) with the query at
(K-1)*w + (p mod w) — not the batched form of ``interface.py``. Tests compare the two.
"""

from __future__ import annotations

import math

import torch

from megatron_ext.ops.longheads.selection import check_longheads_args, compute_dtype
from megatron_ext.ops.rope import apply_rope

__all__ = ["longheads_attn_ref", "longheads_summaries_ref"]


def _rot(x: torch.Tensor, positions: list[int] | torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate rows x [n, D] at the given positions."""
    pos = torch.as_tensor(positions, dtype=torch.long, device=x.device)
    return apply_rope(x[None, :, None, :], pos, theta=theta)[0, :, 0, :]


def longheads_summaries_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_len: int,
    theta: float = 10000.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Chunk summaries r_c, one (batch, chunk, head) at a time.

    Args:
        q: [B, S, H, D]; k, v: [B, S, Hkv, D] (un-rotated).
        chunk_len: w.
        theta: RoPE base.
        softmax_scale: default 1/sqrt(D).

    Returns:
        r: [B, S // w, H, D] in the compute dtype.
    """
    B, S, H, D = q.shape
    n_rep, w = H // k.shape[2], chunk_len
    cd = compute_dtype(q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    local = list(range(w))
    r = torch.zeros(B, S // w, H, D, dtype=cd)
    for b in range(B):
        for c in range(S // w):
            rows = slice(c * w, (c + 1) * w)
            for h in range(H):
                qc = _rot(q[b, rows, h].to(cd), local, theta)
                kc = _rot(k[b, rows, h // n_rep].to(cd), local, theta)
                o = torch.softmax(qc @ kc.T * scale, dim=-1) @ v[b, rows, h // n_rep].to(cd)
                s = o.mean(dim=0)
                r[b, c, h] = torch.softmax(kc @ s * scale, dim=0) @ kc
    return r


def _select(scores: list[float], a: int, num_chunks: int) -> list[int]:
    """Forced 0, a-1, a plus the top-(K-3) of 1..a-2 (ties to the lower index), sorted."""
    free = sorted(range(1, a - 1), key=lambda c: (-scores[c], c))[: num_chunks - 3]
    return sorted({0, a - 1, a, *free})


def longheads_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_len: int = 256,
    num_chunks: int = 16,
    theta: float = 10000.0,
    softmax_scale: float | None = None,
    begin_selective_length: int | None = None,
    selection: str = "head",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LongHeads prefill, one query at a time (same arguments as ``longheads_attn_func``).

    Args:
        q: un-rotated queries [B, S, H, D].
        k: un-rotated keys [B, S, Hkv, D].
        v: values [B, S, Hkv, D].
        chunk_len: w.
        num_chunks: K.
        theta: RoPE base.
        softmax_scale: default 1/sqrt(D).
        begin_selective_length: default K*w.
        selection: "head" or "group".
        return_lse: also return lse.

    Returns:
        out [B, S, H, D] in q's dtype, and if return_lse, lse [B, H, S] in the compute dtype.
    """
    b_sel = check_longheads_args(
        q,
        k,
        v,
        chunk_len=chunk_len,
        num_chunks=num_chunks,
        begin_selective_length=begin_selective_length,
        selection=selection,
    )
    B, S, H, D = q.shape
    n_rep, w, K = H // k.shape[2], chunk_len, num_chunks
    cd = compute_dtype(q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    in_dtype = q.dtype
    q, k, v = q.detach().to(cd), k.detach().to(cd), v.detach().to(cd)
    r = longheads_summaries_ref(q, k, v, chunk_len=w, theta=theta, softmax_scale=scale)
    out = torch.zeros(B, S, H, D, dtype=cd)
    lse = torch.zeros(B, H, S, dtype=cd)
    for b in range(B):
        for p in range(S):
            a = p // w
            # Per-head scores <q_p, r_c> (raw query, no scale) for every complete chunk.
            if p >= b_sel:
                scores = [[float(q[b, p, h] @ r[b, c, h]) for c in range(a - 1)] for h in range(H)]
            for h in range(H):
                g = h // n_rep
                if p < b_sel:  # plain causal RoPE at the original positions
                    keys = list(range(p + 1))
                    k_slots, q_slot = keys, p
                else:
                    if selection == "head":
                        head_scores = scores[h]
                    else:
                        group = range(g * n_rep, (g + 1) * n_rep)
                        head_scores = [
                            sum(scores[i][c] for i in group) / n_rep for c in range(a - 1)
                        ]
                    chunks = _select(head_scores, a, K)
                    keys, k_slots = [], []
                    for t, c in enumerate(chunks):  # t = slot index (t-1 in README.md)
                        end = p + 1 if c == a else (c + 1) * w  # own chunk: j <= p
                        for j in range(c * w, end):
                            keys.append(j)
                            k_slots.append(t * w + j % w)
                    q_slot = (K - 1) * w + p % w
                kr = _rot(k[b, keys, g], k_slots, theta)
                qr = _rot(q[b, p, h][None], [q_slot], theta)[0]
                z = kr @ qr * scale
                lse[b, h, p] = torch.logsumexp(z, dim=0)
                out[b, p, h] = torch.softmax(z, dim=0) @ v[b, keys, g]
    out = out.to(in_dtype)
    return (out, lse) if return_lse else out
