"""Public CoCA op: ``coca_attn_func`` (maths: README.md in this folder).

One function, two ways to say where the tokens are: explicit per-document positions
(``q_positions`` / ``k_positions`` with optional ``q_doc_ids`` / ``k_doc_ids``: what layers,
context parallelism and the KV cache use), or the index form (``q_offset``, ``doc_ids``), a
thin wrapper that computes those positions. Both run ``CoCAAttention``: the closed-form
backward prologues of ``prologue.py`` give ``Q'`` and ``K'``, then exact attention on
``(Q', K', v)``; out, lse and every gradient equal the dense definition in ``reference.py``.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.coca.method import CoCAAttention
from megatron_ext.ops.coca.reference import _check_args
from megatron_ext.ops.meta import call_metas
from megatron_ext.ops.rope import RopeScaling

__all__ = ["coca_attn_func"]


def coca_attn_func(
    q: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    *,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    q_doc_ids: torch.Tensor | None = None,
    k_doc_ids: torch.Tensor | None = None,
    theta: float = 10000.0,
    form: str = "slack",
    causal: bool = True,
    softmax_scale: float | None = None,
    rope_scaling: RopeScaling | None = None,
    rotary_dim: int | None = None,
    seq_len: int | None = None,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Collinear constrained attention (CoCA), differentiable w.r.t. q, t and v.

    Key j is visible to query i when both are in the same document and, with ``causal``,
    ``p_j <= p_i`` on their per-document positions. GQA: query head h reads KV head
    ``h // (H // Hkv)``.

    Args:
        q: [B, Sq, H, D] un-rotated queries, D even.
        t: [B, Sk, Hkv, D] raw ``t_proj`` output (it has the shape k would have).
        v: [B, Sk, Hkv, D] values.
        q_positions, k_positions: int [S] or [B, S] per-document positions (negative =
            padding). Give both, or neither and use the index form below.
        q_doc_ids, k_doc_ids: optional document ids (equal id = same document), both or neither.
        theta: RoPE base.
        form: "slack" (what the released code computes; default) or "strict" (paper Eq. 9).
        causal: apply the causal mask.
        softmax_scale: logit scale, default 1/sqrt(D).
        rope_scaling: optional RopeScaling.
        rotary_dim: must be None or D (CoCA rotates the whole head).
        seq_len: dynamic-NTK length L; default max position + 1 over queries and keys.
        q_offset: index form: query row r is key index ``q_offset + r`` (bottom-right aligned
            when ``q_offset = Sk - Sq``, as in decode or chunked prefill).
        doc_ids: index form: int [B, Sk]; documents are maximal runs of equal ids, positions
            restart at 0 in each, query rows take ``doc_ids[:, q_offset : q_offset + Sq]``.
        return_lse: also return the log-sum-exp of the logits.

    Returns:
        out [B, Sq, H, D] in q's dtype; with return_lse also lse [B, H, Sq] (fp32; fp64 for
        fp64 inputs). Rows with no visible key give out 0 and lse -inf.
    """
    explicit = q_positions is not None or k_positions is not None
    scale = _check_args(
        q, t, v, form=form, causal=causal, softmax_scale=softmax_scale,
        q_offset=0 if explicit else q_offset, doc_ids=None if explicit else doc_ids,
        rotary_dim=rotary_dim,
    )  # fmt: skip
    qm, km = call_metas(
        q.shape[0], q.shape[1], t.shape[1], q_positions=q_positions, k_positions=k_positions,
        q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids, q_offset=q_offset, doc_ids=doc_ids,
    )  # fmt: skip
    method = CoCAAttention(form=form, theta=theta, scaling=rope_scaling, rotary_dim=rotary_dim,
                           causal=causal, softmax_scale=scale)
    out = method(q, t, v, q_meta=qm, k_meta=km, rope_len=seq_len, return_lse=return_lse)
    if return_lse:
        return out[0].to(q.dtype), out[1]
    return out.to(q.dtype)
