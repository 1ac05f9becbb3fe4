"""Public Dual Chunk Attention op: ``dual_chunk_attn_func``.

Rotates the keys once at ``j mod C`` and runs the three DCA passes (one interval-attention call
each, over all query rows) through ``dual_chunk_block`` (../shared/METHODS.md §5), merging them
exactly so that gradients are those of the dense definition in ``reference.py``. Same
signature as ``dual_chunk_attn_ref``. CUDA inputs without ``doc_ids`` take the fused Triton
kernel instead (``triton_dca.py``).
"""

from __future__ import annotations

import torch

from megatron_ext.ops.dual_chunk import triton_dca
from megatron_ext.ops.dual_chunk.block import dca_rotate_keys, dual_chunk_block
from megatron_ext.ops.dual_chunk.positions import check_chunk_args, check_qkv, dca_layout

__all__ = ["dual_chunk_attn_func"]


def dual_chunk_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    theta: float = 10000.0,
    softmax_scale: float | None = None,
    q_offset: int = 0,
    original_max_position_embeddings: int | None = None,
    return_lse: bool = False,
    doc_ids: torch.Tensor | None = None,
    seq_len: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dual Chunk Attention (training-free long context) with exact gradients.

    Query i sees keys j <= i (bottom-right aligned when q_offset = Sk - Sq). With chunk length
    C = chunk_size - local_size, keys are rotated at ``j mod C`` and the query at ``i mod C``
    (same chunk, causal), ``min(C + i mod C, chunk_size)`` (previous chunk) or
    ``min(2C - 1, chunk_size)`` (older chunks); logits are also scaled by T² when
    ``original_max_position_embeddings`` is set. See the folder README for the maths.

    Args:
        q: UN-ROTATED queries [B, Sq, H, D]; row r has position q_offset + r <= Sk - 1.
        k: UN-ROTATED keys [B, Sk, Hkv, D] at positions 0..Sk-1; H % Hkv == 0.
        v: values [B, Sk, Hkv, D].
        chunk_size: M, the largest position index DCA uses (the paper's "chunk size").
        local_size: W, 0 <= W < M; the chunk length is C = M - W.
        theta: RoPE base.
        softmax_scale: default 1/sqrt(D).
        q_offset: position of query row 0 (chunked prefill, decode).
        original_max_position_embeddings: L_o; when set (> 0), T = max(1, 0.1 ln(L/L_o) + 1).
        return_lse: also return the lse.
        doc_ids: optional int [B, Sk] document ids of a packed row; each maximal run of equal
            ids is a document, positions restart in each, queries use the ids at rows
            q_offset + r (so q_offset + Sq <= Sk).
        seq_len: temperature length L; default q_offset + Sq, or with doc_ids the query's
            document length up to the last query. Pass the planned total length when decoding.

    Returns:
        out [B, Sq, H, D] in q's dtype; with return_lse also lse [B, H, Sq] (fp32, fp64 for fp64
        inputs, natural log of the sum of exp of the final logits).
    """
    check_qkv(q, k, v)
    check_chunk_args(chunk_size, local_size)
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"softmax_scale={softmax_scale!r}; expected None or > 0")
    B, Sq = q.shape[:2]
    Sk = k.shape[1]
    q_pos, k_pos, q_doc, k_doc, temp = dca_layout(
        B,
        Sq,
        Sk,
        q_offset=q_offset,
        doc_ids=doc_ids,
        seq_len=seq_len,
        original_max_position_embeddings=original_max_position_embeddings,
        device=q.device,
    )
    if triton_dca.use_triton(q, doc_ids):  # fused kernel on CUDA (no doc_ids); see triton_dca
        out, lse = triton_dca.dual_chunk_attn_triton(
            q, k, v, q_positions=q_pos, k_positions=k_pos, temperature=temp,
            chunk_size=chunk_size, local_size=local_size, theta=theta,
            softmax_scale=softmax_scale, q_offset=q_offset,
        )  # fmt: skip
        return (out, lse) if return_lse else out
    k_rot = dca_rotate_keys(k, k_pos, chunk_size=chunk_size, local_size=local_size, theta=theta)
    out, lse = dual_chunk_block(
        q,
        k_rot,
        v,
        q_positions=q_pos,
        k_positions=k_pos,
        chunk_size=chunk_size,
        local_size=local_size,
        theta=theta,
        softmax_scale=softmax_scale,
        q_doc_ids=q_doc,
        k_doc_ids=k_doc,
        temperature=temp,
    )
    return (out, lse) if return_lse else out
