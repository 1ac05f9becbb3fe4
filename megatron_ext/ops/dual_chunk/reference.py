"""Dense Dual Chunk Attention: the definition, used as the oracle for values and gradients.

Builds the full [Sq, Sk] logit matrix pair by pair from the position rule of
README.md, "Position rule" (``dca_position_rule``), masks, and takes one softmax. It knows nothing
about passes or merges, so the pass-based fast path in ``interface.py`` is checked against an
independent construction. O(Sq * Sk) memory: tests and tiny inputs only.
"""

from __future__ import annotations

import math

import torch

from megatron_ext.ops.dual_chunk.positions import (
    check_chunk_args,
    check_qkv,
    dca_layout,
    dca_position_rule,
)
from megatron_ext.ops.rope import RopeScaling, apply_rope

__all__ = ["dual_chunk_attn_ref"]


def _softmax_with_lse(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax and natural-log lse of masked logits z (-inf = hidden); empty rows give 0, -inf.

    Written so that autograd stays finite on empty rows, even with an incoming d(lse).
    """
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    s = e.sum(dim=-1, keepdim=True)
    nonempty = s > 0
    s_safe = torch.where(nonempty, s, torch.ones_like(s))
    p = e / s_safe
    lse = torch.where(nonempty, m + torch.log(s_safe), torch.full_like(s, float("-inf")))
    return p, lse.squeeze(-1)


def dual_chunk_attn_ref(
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
    rope_scaling: RopeScaling | None = None,
    scaling_factor: float = 1.0,
    extension_factor: float | None = None,
    rotary_dim: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dual Chunk Attention by its definition (dense, differentiable by autograd).

    For query i and visible key j <= i (same document), with C = chunk_size - local_size:
    ``z_ij = scale * T_i^2 * <R_{pos_q(i, j)} q_i, R_{j mod C} k_j>`` where pos_q follows the
    intra / successive / inter rule of ``dca_position_rule``; ``out_i = softmax_j(z_i) v``.

    Args:
        q: UN-ROTATED queries [B, Sq, H, D]; row r has position q_offset + r <= Sk - 1.
        k: UN-ROTATED keys [B, Sk, Hkv, D], positions 0..Sk-1; H % Hkv == 0.
        v: values [B, Sk, Hkv, D].
        chunk_size: M, the largest position index used (not the chunk length).
        local_size: W, 0 <= W < M; the chunk length is C = M - W.
        theta: RoPE base.
        softmax_scale: default 1/sqrt(D).
        q_offset: position of query row 0.
        original_max_position_embeddings: L_o for the temperature; None or 0 = no temperature.
        return_lse: also return lse.
        doc_ids: optional int [B, Sk]; each maximal run of equal ids is a document whose
            positions restart at 0; queries take the ids at rows q_offset + r.
        seq_len: temperature length L (default: the document length up to the last query, or
            q_offset + Sq without doc_ids), and the dynamic-NTK length (default: the largest
            position + 1).
        rope_scaling: optional RoPE frequency scaling of every rotation.
        scaling_factor: chunk-local positions are divided by it before rotating (ChunkLlama).
        extension_factor: cos and sin x mscale = 1 + 0.05 ln(f) when f > 1 (ChunkLlama), so the
            rotated dims' logits carry mscale^2.
        rotary_dim: rotated dims per head; the rest is position-free.

    Returns:
        out [B, Sq, H, D] in q's dtype, and with return_lse the lse [B, H, Sq] (fp32; fp64 for
        fp64 inputs). Rows without visible keys give out = 0 and lse = -inf.
    """
    check_qkv(q, k, v)
    check_chunk_args(chunk_size, local_size)
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
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
    q_pos, k_pos = q_pos.expand(B, Sq), k_pos.expand(B, Sk)
    pos_q, pos_k = dca_position_rule(
        q_pos, k_pos, chunk_size=chunk_size, local_size=local_size
    )  # [B, Sq, Sk], [B, Sk]

    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    L = seq_len if seq_len is not None else int(max(q_pos.max(), k_pos.max())) + 1
    mscale = 1 + 0.05 * math.log(extension_factor) if (extension_factor or 0) > 1 else 1.0
    if scaling_factor != 1.0 or mscale != 1.0:
        if rope_scaling is not None:
            raise ValueError("scaling_factor / extension_factor and rope_scaling are exclusive")
        rope_scaling = RopeScaling("linear", scaling_factor,
                                   attention_factor=mscale if mscale != 1 else None)
    rope = {"theta": theta, "scaling": rope_scaling, "seq_len": L, "rotary_dim": rotary_dim}
    k_rot = apply_rope(kf, pos_k, **rope).repeat_interleave(H // Hkv, dim=2)
    vf = vf.repeat_interleave(H // Hkv, dim=2)
    z = torch.zeros(B, H, Sq, Sk, dtype=dt, device=q.device)
    # Every query position the rule uses, one rotation of all rows each; pick per pair.
    for p in torch.unique(pos_q).tolist():
        q_rot = apply_rope(qf, torch.full((Sq,), p, dtype=torch.long, device=q.device), **rope)
        z_p = torch.einsum("bihd,bjhd->bhij", q_rot, k_rot)
        z = torch.where((pos_q == p).unsqueeze(1), z_p, z)
    z = z * (scale * temp.to(dt) ** 2).expand(B, Sq)[:, None, :, None]

    visible = torch.arange(Sk, device=q.device) <= torch.arange(
        q_offset, q_offset + Sq, device=q.device
    ).unsqueeze(-1)  # [Sq, Sk], causal on row indices
    visible = visible.expand(B, Sq, Sk)
    if q_doc is not None:
        visible = visible & (q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2))
    z = z.masked_fill(~visible.unsqueeze(1), float("-inf"))
    p_attn, lse = _softmax_with_lse(z)
    out = torch.einsum("bhij,bjhd->bihd", p_attn, vf).to(q.dtype)
    return (out, lse) if return_lse else out
