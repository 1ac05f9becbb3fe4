"""Dense CoCA reference: the N×N definition of README.md (strict and slack forms), the oracle.

Slack form (released code): the three-operand contraction
``s(m, n) = (1/sqrt(D)) sum_d q_m[d] (R_n t_dup_n)[d] (R_m q_m)[d]``, evaluated as written, i.e.
through a [B, Sq, Sk, H, D] product with no factorisation. Strict form (paper Eq. 9):
``a(m, n) = (1/sqrt(D)) sum_i tau_{n,i} |q_{m,i}|^2 cos((m - n) w_i)`` through a
[B, Sq, Sk, H, D/2] product. Both are masked, softmaxed and applied to v in fp32 (fp64 for fp64
inputs), and are plain autograd graphs. Memory is O(B·Sq·Sk·H·D): tests and tiny inputs only.

``cos((m - n) w_i)`` is evaluated as ``c_m c_n + s_m s_n`` from the RoPE tables of
``megatron_ext.ops.rope``, so every RoPE scaling (and YaRN's attention factor, which appears
squared) applies to the strict form exactly as it does to the fast path.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.attention_ref import attention_mask, check_attn_args
from megatron_ext.ops.coca.prologue import (
    _check_form,
    _check_head_dim,
    coca_positions,
    coca_rope_seq_len,
    coca_tau,
)
from megatron_ext.ops.rope import RopeScaling, apply_rope, rope_cos_sin

__all__ = ["coca_attn_ref"]


def _check_inputs(q: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("t", t), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name}.shape={tuple(x.shape)}; expected [B, S, H, D]")
    if t.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"t.shape={tuple(t.shape)}; t has the shape of k, so it must match v.shape[:3]="
            f"{tuple(v.shape[:3])}"
        )
    if t.shape[0] != q.shape[0] or t.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"t.shape={tuple(t.shape)}; expected [B={q.shape[0]}, Sk, Hkv, D={q.shape[-1]}] "
            f"for q.shape={tuple(q.shape)}"
        )
    H, Hkv = q.shape[2], t.shape[2]
    if H % Hkv:
        raise ValueError(f"H={H}, Hkv={Hkv}; query heads must be a multiple of KV heads")


def _check_args(q, t, v, *, form, causal, softmax_scale, q_offset, doc_ids, rotary_dim) -> float:
    """Validate the common CoCA arguments; return the softmax scale (default 1/sqrt(D))."""
    _check_inputs(q, t, v)
    _check_form(form)
    _check_head_dim(q.shape[-1], rotary_dim, form == "strict")
    return check_attn_args(
        q, t, v, causal=causal, window=None, chunk=None, softmax_scale=softmax_scale,
        q_offset=q_offset, doc_ids=doc_ids,
    )  # fmt: skip


def coca_attn_ref(
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
    """Dense CoCA attention (slack three-operand contraction or strict Eq. 9 sum).

    Same signature and semantics as ``coca_attn_func``; see the module docstring for the maths.
    Query row r has absolute index ``q_offset + r`` against keys ``0 .. Sk-1`` (causal keeps
    ``j <= q_offset + r``; bottom-right aligned when ``q_offset = Sk - Sq``).

    Args:
        q: [B, Sq, H, D] un-rotated queries.
        t: [B, Sk, Hkv, D] raw ``t_proj`` output (shape of k).
        v: [B, Sk, Hkv, D] values.
        theta: RoPE base.
        form: "slack" or "strict".
        causal: apply the causal mask.
        softmax_scale: logit scale, default 1/sqrt(D).
        q_offset: absolute index of query row 0.
        return_lse: also return the log-sum-exp.
        doc_ids: optional int tensor [B, Sk]; keys and queries only see their own document and
            RoPE positions restart at 0 in each document.
        rope_scaling: optional RopeScaling (dynamic NTK uses L = largest position + 1).
        rotary_dim: None or D; fewer dims (slack only) rotate only the first rotary_dim dims
            of q and of the duplicated tau (the GPT-NeoX release).

    Returns:
        out [B, Sq, H, D] in q's dtype; with return_lse also lse [B, H, Sq] fp32 (fp64 for fp64
        inputs). Rows with no visible key give out 0 and lse -inf.
    """
    scale = _check_args(
        q, t, v, form=form, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset,
        doc_ids=doc_ids, rotary_dim=rotary_dim,
    )  # fmt: skip
    strict = form == "strict"
    B, Sq, H, D = q.shape
    Sk, Hkv = t.shape[1], t.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, tc, vc = q.to(cdt), t.to(cdt), v.to(cdt)

    pos_q, pos_k = coca_positions(Sq, Sk, q_offset=q_offset, doc_ids=doc_ids, device=q.device)
    seq_len = coca_rope_seq_len(pos_q, pos_k, rope_scaling)
    rope = {"theta": theta, "scaling": rope_scaling, "seq_len": seq_len, "rotary_dim": rotary_dim}
    n_rep = H // Hkv
    tau = coca_tau(tc).repeat_interleave(n_rep, dim=2)  # [B, Sk, H, D/2]
    if strict:
        rope.pop("rotary_dim")  # strict is full-head only (checked above)
        cq, sq = rope_cos_sin(pos_q, D, dtype=cdt, **rope)
        ck, sk = rope_cos_sin(pos_k, D, dtype=cdt, **rope)
        cq, sq, ck, sk = (x[..., : D // 2].expand(B, -1, -1) for x in (cq, sq, ck, sk))
        # cos((m - n) w_i) (times YaRN's a^2): [B, Sq, Sk, D/2]
        cos_diff = cq[:, :, None] * ck[:, None] + sq[:, :, None] * sk[:, None]
        q1, q2 = qc.split(D // 2, dim=-1)
        energy = q1 * q1 + q2 * q2  # [B, Sq, H, D/2]
        prod = energy[:, :, None] * tau[:, None] * cos_diff[:, :, :, None]
    else:
        q_rot = apply_rope(qc, pos_q, **rope)  # R_m q_m
        t_rot = apply_rope(torch.cat((tau, tau), dim=-1), pos_k, **rope)  # R_n t_dup_n
        prod = qc[:, :, None] * t_rot[:, None] * q_rot[:, :, None]  # [B, Sq, Sk, H, D]
    z = prod.sum(-1).permute(0, 3, 1, 2) * scale  # [B, H, Sq, Sk]

    mask = attention_mask(
        Sq, Sk, causal=causal, q_offset=q_offset, doc_ids=doc_ids, device=q.device
    ).unsqueeze(1)  # [B | 1, 1, Sq, Sk], the package's masks (docs/methods/conventions.md)
    z = z.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)  # [B, H, Sq]; -inf on rows with no visible key
    finite = torch.isfinite(lse)
    p = torch.exp(z - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    out = torch.einsum("bhmn,bnhd->bmhd", p, vc.repeat_interleave(n_rep, dim=2))
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
