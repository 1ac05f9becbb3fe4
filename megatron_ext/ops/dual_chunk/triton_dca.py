"""Dual Chunk Attention on the fused Triton kernel (README.md, "Exact forms", form 3).

Keys are rotated once at ``j mod C`` and the queries three times (intra, successive, inter) by
the differentiable rotations of ``block.py``; ``triton_dca_attention`` then runs all (query
tile, key tile) pairs in one launch, choosing the query copy per element by
``delta = i // C - j // C`` inside one online softmax. Its backward returns dq_intra, dq_succ
and dq_inter separately; autograd rotates each back through its RoPE, and dK' back through the
key rotation, so the gradients are those of ``dual_chunk_attn_ref``.

Not on this path: packed documents (``doc_ids``) and per-query temperatures (which only arise
with documents). ``dual_chunk_attn_func`` keeps the pass-based torch path for those.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.backend import resolve_backend
from megatron_ext.ops.dual_chunk.block import dca_rotate_keys, dca_rotate_queries
from megatron_ext.ops.rope import RopeScaling
from megatron_ext.ops.triton import triton_attention_supported, triton_dca_attention

__all__ = ["dual_chunk_attn_triton", "use_triton"]


def use_triton(q: torch.Tensor, doc_ids: torch.Tensor | None) -> bool:
    """Whether ``dual_chunk_attn_func`` takes the fused Triton path (``backend`` decides).

    Packed documents always take the pass-based path (the fused kernel has no document mask);
    forcing "triton" then fails in the interval engine with a clear error.
    """
    if doc_ids is not None:
        return False
    if resolve_backend(q, "dca") != "triton":
        return False
    if not triton_attention_supported(q):
        raise ValueError(
            f"backend 'triton' cannot run DCA on these inputs (D={q.shape[-1]}, dtype={q.dtype}, "
            f"device={q.device}): the fused kernel takes D in triton.HEAD_DIMS and CUDA tensors "
            "(CPU tensors only under the Triton interpreter)"
        )
    return True


def dual_chunk_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    temperature: torch.Tensor | None,
    chunk_size: int,
    local_size: int,
    theta: float = 10000.0,
    softmax_scale: float | None = None,
    q_offset: int = 0,
    keys_rotated: bool = False,
    scaling: RopeScaling | None = None,
    seq_len: int | None = None,
    rotary_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DCA of un-rotated q via the fused kernel (arguments checked by the caller).

    Args:
        q: [B, Sq, H, D] un-rotated queries at positions ``q_positions`` = q_offset + r.
        k, v: [B, Sk, Hkv, D]; k at positions ``k_positions`` = 0..Sk-1, un-rotated unless
            ``keys_rotated`` (then already ``dca_rotate_keys`` output).
        q_positions: int [Sq]; k_positions: int [Sk] (the plain layout, no documents).
        temperature: None or fp64 [Sq] holding one value (T); logits are scaled by T².
        chunk_size, local_size: M and W (C = M - W).
        theta, scaling, seq_len, rotary_dim: RoPE base, frequency scaling, dynamic-NTK length
            and rotated dims per head.
        softmax_scale: default 1/sqrt(D). q_offset: position of row 0.

    Returns:
        out [B, Sq, H, D] in q's dtype; lse [B, H, Sq] fp32 (fp64 for fp64 inputs).
    """
    if q_positions.dim() != 1 or k_positions.dim() != 1:
        raise ValueError(
            f"q_positions / k_positions of shapes {tuple(q_positions.shape)} / "
            f"{tuple(k_positions.shape)}; the fused path takes shared 1-D positions (no doc_ids)"
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if temperature is not None and temperature.numel():
        t0 = temperature.flatten()[0]
        if not bool((temperature == t0).all()):
            raise ValueError("temperature varies across queries; the fused path takes one T")
        scale *= float(t0) ** 2
    rope = {"chunk_size": chunk_size, "local_size": local_size, "theta": theta,
            "scaling": scaling, "seq_len": seq_len, "rotary_dim": rotary_dim}
    k_rot = k if keys_rotated else dca_rotate_keys(k, k_positions, **rope)
    q_intra, q_succ, q_inter = dca_rotate_queries(q, q_positions, **rope)
    return triton_dca_attention(
        q_intra, q_succ, q_inter, k_rot, v, chunk_len=chunk_size - local_size,
        softmax_scale=scale, q_offset=q_offset,
    )  # fmt: skip
