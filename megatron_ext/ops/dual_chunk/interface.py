"""Public Dual Chunk Attention op: ``dual_chunk_attn_func`` (maths: README.md in this folder).

Two ways to say where the tokens are: explicit per-document positions (``q_positions`` /
``k_positions``, optional ``q_doc_ids`` / ``k_doc_ids``: what layers, context parallelism and
the KV cache use), or the index form (``q_offset``, ``doc_ids``), a thin wrapper computing those
positions. Both run ``DualChunkAttention``: keys rotated once at ``j mod C``, the three passes
merged exactly (or the fused Triton kernel where ``backend`` picks it), so gradients are those
of the dense definition in ``reference.py``.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.dual_chunk.method import DCAParams, DualChunkAttention
from megatron_ext.ops.dual_chunk.positions import check_qkv
from megatron_ext.ops.meta import call_metas
from megatron_ext.ops.rope import RopeScaling

__all__ = ["dual_chunk_attn_func"]


def dual_chunk_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    q_doc_ids: torch.Tensor | None = None,
    k_doc_ids: torch.Tensor | None = None,
    theta: float = 10000.0,
    softmax_scale: float | None = None,
    original_max_position_embeddings: int | None = None,
    rope_scaling: RopeScaling | None = None,
    scaling_factor: float = 1.0,
    extension_factor: float | None = None,
    rotary_dim: int | None = None,
    seq_len: int | None = None,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dual Chunk Attention (training-free long context) with exact gradients.

    Query i sees keys j <= i of its document. With chunk length C = chunk_size - local_size,
    keys are rotated at ``j mod C`` and the query at ``i mod C`` (same chunk, causal),
    ``min(C + i mod C, chunk_size)`` (previous chunk) or ``min(2C - 1, chunk_size)`` (older
    chunks); logits are also scaled by T² when ``original_max_position_embeddings`` is set.

    Args:
        q: UN-ROTATED queries [B, Sq, H, D].
        k: UN-ROTATED keys [B, Sk, Hkv, D]; H % Hkv == 0.
        v: values [B, Sk, Hkv, D].
        chunk_size: M, the largest position index DCA uses (the paper's "chunk size").
        local_size: W, 0 <= W < M; the chunk length is C = M - W.
        q_positions, k_positions: int [S] or [B, S] per-document positions (negative =
            padding). Give both, or neither and use the index form.
        q_doc_ids, k_doc_ids: optional document ids (equal id = same document), both or neither.
        theta: RoPE base.
        softmax_scale: default 1/sqrt(D).
        original_max_position_embeddings: L_o; when set (> 0), T = max(1, 0.1 ln(L/L_o) + 1).
        rope_scaling: optional RoPE frequency scaling of every rotation.
        scaling_factor: ChunkLlama position interpolation: chunk-local positions divided by it
            (exclusive with ``rope_scaling``).
        extension_factor: ChunkLlama ``scale``: cos and sin x mscale = 1 + 0.05
            ln(extension_factor) when it is > 1 (rotated dims' logits x mscale^2).
        rotary_dim: rotated dims per head (partial rotary); default D.
        seq_len: the length L of length rules (temperature and dynamic NTK); default what the
            call shows: each query's document length (max position + 1 up to the last query)
            for the temperature, the largest position + 1 for dynamic NTK. Pass the planned
            total length when decoding.
        q_offset: index form: query row r is key index ``q_offset + r`` (<= Sk - 1).
        doc_ids: index form: int [B, Sk]; each maximal run of equal ids is a document whose
            positions restart at 0; queries use the ids at rows q_offset + r.
        return_lse: also return the lse.

    Returns:
        out [B, Sq, H, D] in q's dtype; with return_lse also lse [B, H, Sq] (fp32, fp64 for fp64
        inputs, natural log of the sum of exp of the final logits).
    """
    check_qkv(q, k, v)
    params = DCAParams(chunk_size, local_size, original_max_position_embeddings or None,
                       scaling_factor, extension_factor)
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"softmax_scale={softmax_scale!r}; expected None or > 0")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                or seq_len < 1):
        raise ValueError(f"seq_len={seq_len!r}; expected None or an int >= 1")
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    if q_positions is None and k_positions is None:
        if not isinstance(q_offset, int) or q_offset < 0:
            raise ValueError(f"q_offset={q_offset!r}; expected an int >= 0")
        if q_offset + Sq > Sk:
            raise ValueError(
                f"q_offset + Sq = {q_offset} + {Sq} > Sk = {Sk}; every query row must also be a "
                "key (keys 0..Sk-1 include the queries, as in a KV cache)"
            )
    qm, km = call_metas(
        B, Sq, Sk, q_positions=q_positions, k_positions=k_positions, q_doc_ids=q_doc_ids,
        k_doc_ids=k_doc_ids, q_offset=q_offset, doc_ids=doc_ids, seq_len=seq_len,
    )  # fmt: skip
    method = DualChunkAttention(params, theta=theta, scaling=rope_scaling, rotary_dim=rotary_dim,
                                softmax_scale=softmax_scale)
    out = method(q, k, v, q_meta=qm, k_meta=km, rope_len=seq_len, return_lse=return_lse)
    if return_lse:
        return out[0].to(q.dtype), out[1]
    return out.to(q.dtype)
