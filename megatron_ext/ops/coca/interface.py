"""CoCA attention, fast path: prologue + any exact attention kernel (../shared/METHODS.md §2).

``coca_attn_func`` builds ``Q' = q ⊙ RoPE(q)`` and ``K' = RoPE(concat(tau, tau))`` (slack), or
the strict ``Q''`` / ``K''``, with the closed-form-backward prologues of ``prologue.py``, then
runs the package's memory-efficient ``attention_func`` on ``(Q', K', v)`` with scale 1/sqrt(D).
Because the CoCA logit is exactly ``<Q'_m, K'_n> / sqrt(D)``, out, lse and all gradients equal
the dense definition in ``reference.py``; nothing N×N is stored.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.attention import attention_func
from megatron_ext.ops.coca.prologue import (
    coca_key_prologue,
    coca_positions,
    coca_query_prologue,
    coca_rope_seq_len,
)
from megatron_ext.ops.coca.reference import _check_args
from megatron_ext.ops.rope import RopeScaling

__all__ = ["coca_attn_func"]


def coca_attn_func(
    q: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    *,
    theta: float = 10000.0,
    form: str = "slack",
    causal: bool = True,
    softmax_scale: float | None = None,
    q_offset: int = 0,
    return_lse: bool = False,
    doc_ids: torch.Tensor | None = None,
    rope_scaling: RopeScaling | None = None,
    rotary_dim: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Collinear constrained attention (CoCA), differentiable w.r.t. q, t and v.

    Query row r has absolute index ``q_offset + r`` against keys ``0 .. Sk-1``; causal keeps key
    j iff ``j <= q_offset + r`` (bottom-right aligned when ``q_offset = Sk - Sq``, as in decode
    or chunked prefill). RoPE positions are these indices, restarted at 0 in each document when
    ``doc_ids`` is given. GQA: query head h reads KV head ``h // (H // Hkv)``.

    Args:
        q: [B, Sq, H, D] un-rotated queries, D even.
        t: [B, Sk, Hkv, D] raw ``t_proj`` output (it has the shape k would have).
        v: [B, Sk, Hkv, D] values.
        theta: RoPE base.
        form: "slack" (what the released code computes; default) or "strict" (paper Eq. 9).
        causal: apply the causal mask.
        softmax_scale: logit scale, default 1/sqrt(D).
        q_offset: absolute index of query row 0 (>= 0).
        return_lse: also return the log-sum-exp of the logits.
        doc_ids: optional int tensor [B, Sk] of document ids (packed rows); attention stays
            inside a document, and query rows use ``doc_ids[:, q_offset : q_offset + Sq]``.
        rope_scaling: optional RopeScaling; dynamic NTK uses L = largest position + 1 of the
            call for both queries and keys.
        rotary_dim: must be None or D (CoCA rotates the whole head).

    Returns:
        out [B, Sq, H, D] in q's dtype; with return_lse also lse [B, H, Sq] (fp32; fp64 for
        fp64 inputs). Rows with no visible key give out 0 and lse -inf.
    """
    scale = _check_args(
        q, t, v, form=form, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset,
        doc_ids=doc_ids, rotary_dim=rotary_dim,
    )  # fmt: skip
    Sq = q.shape[1]
    pos_q, pos_k = coca_positions(
        Sq, t.shape[1], q_offset=q_offset, doc_ids=doc_ids, device=q.device
    )
    rope = {
        "form": form,
        "theta": theta,
        "scaling": rope_scaling,
        "seq_len": coca_rope_seq_len(pos_q, pos_k, rope_scaling),
    }
    q_prime = coca_query_prologue(q, pos_q, **rope)
    k_prime = coca_key_prologue(t, pos_k, **rope)
    out, lse = attention_func(
        q_prime,
        k_prime,
        v,
        causal=causal,
        softmax_scale=scale,
        q_offset=q_offset,
        doc_ids=doc_ids,
    )
    return (out, lse) if return_lse else out
