"""Fused Triton kernels for the CoCA prologues (one read of q or t, one write of Q' or K').

The torch prologue in ``prologue.py`` runs about ten element-wise passes over q and t; on a GPU
those passes cost as much as a whole flash-attention call at moderate lengths. These kernels do
the same maths (README.md, "The factorisation and why it is exact", "Prologue backward") in
one pass per direction: each program takes ``BLOCK_R`` rows of ``[B * S * Hx, D]`` and handles
the RoPE plane pairs ``(i, i + D/2)`` of those rows in fp32 registers.

Used by the autograd Functions of ``prologue.py`` for CUDA tensors (fp16, bf16, fp32); fp64 and
CPU tensors take the torch path. Under ``TRITON_INTERPRET=1`` they also run on CPU tensors, which
is how the tests compare them with the torch path.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = ["coca_prologue_bwd", "coca_prologue_fwd", "triton_available"]

_TILE = 4096  # elements of one half-row tile per program (BLOCK_R * BLOCK_H)


def triton_available() -> bool:
    """Whether triton could be imported."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _coca_prologue_fwd_kernel(
        X,
        COS,
        SIN,
        OUT,
        n_rows,
        S,
        HX,
        COS_BSTRIDE,
        HALF: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_H: tl.constexpr,
        IS_KEY: tl.constexpr,
        STRICT: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
        tab = ((rows // (S * HX)) * COS_BSTRIDE + ((rows // HX) % S) * HALF)[:, None] + cols
        c = tl.load(COS + tab, mask=mask, other=0.0)
        s = tl.load(SIN + tab, mask=mask, other=0.0)
        off = rows[:, None] * (2 * HALF) + cols[None, :]
        x1 = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + off + HALF, mask=mask, other=0.0).to(tl.float32)
        if IS_KEY:
            tau = tl.maximum((x1 + x2) * 0.5, 0.0)
            if STRICT:  # K'' = RoPE(concat(tau, 0))
                y1 = tau * c
                y2 = tau * s
            else:  # K' = RoPE(concat(tau, tau))
                y1 = tau * (c - s)
                y2 = tau * (c + s)
        else:
            if STRICT:  # Q'' = RoPE(concat(|q_i|^2, 0))
                e = x1 * x1 + x2 * x2
                y1 = e * c
                y2 = e * s
            else:  # Q' = q * RoPE(q)
                y1 = x1 * (x1 * c - x2 * s)
                y2 = x2 * (x2 * c + x1 * s)
        tl.store(OUT + off, y1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + off + HALF, y2.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _coca_prologue_bwd_kernel(
        X,
        COS,
        SIN,
        G,
        DX,
        n_rows,
        S,
        HX,
        COS_BSTRIDE,
        HALF: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_H: tl.constexpr,
        IS_KEY: tl.constexpr,
        STRICT: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
        tab = ((rows // (S * HX)) * COS_BSTRIDE + ((rows // HX) % S) * HALF)[:, None] + cols
        c = tl.load(COS + tab, mask=mask, other=0.0)
        s = tl.load(SIN + tab, mask=mask, other=0.0)
        off = rows[:, None] * (2 * HALF) + cols[None, :]
        x1 = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + off + HALF, mask=mask, other=0.0).to(tl.float32)
        g1 = tl.load(G + off, mask=mask, other=0.0).to(tl.float32)
        g2 = tl.load(G + off + HALF, mask=mask, other=0.0).to(tl.float32)
        if IS_KEY:
            if STRICT:
                dtau = g1 * c + g2 * s
            else:  # sum of the two halves of RoPE^-1(dK')
                dtau = g1 * (c - s) + g2 * (c + s)
            d1 = tl.where((x1 + x2) * 0.5 > 0.0, dtau, 0.0) * 0.5
            d2 = d1
        else:
            if STRICT:
                da = g1 * c + g2 * s
                d1 = 2.0 * x1 * da
                d2 = 2.0 * x2 * da
            else:  # dq = dQ' * RoPE(q) + RoPE^-1(dQ' * q)
                p1 = g1 * x1
                p2 = g2 * x2
                d1 = g1 * (x1 * c - x2 * s) + p1 * c + p2 * s
                d2 = g2 * (x2 * c + x1 * s) + p2 * c - p1 * s
        tl.store(DX + off, d1.to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + off + HALF, d2.to(DX.dtype.element_ty), mask=mask)


def _launch_args(x: torch.Tensor, cos: torch.Tensor) -> tuple:
    """Grid and shape arguments for x [B, S, Hx, D] and tables [Bp, S, D/2] (Bp = 1 or B)."""
    B, S, HX, D = x.shape
    half = D // 2
    block_h = triton.next_power_of_2(half)
    block_r = max(1, _TILE // block_h)
    n_rows = B * S * HX
    grid = (triton.cdiv(n_rows, block_r),)
    bstride = 0 if cos.shape[0] == 1 else S * half
    return grid, (n_rows, S, HX, bstride), {"HALF": half, "BLOCK_R": block_r, "BLOCK_H": block_h}


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    B, S, _, D = x.shape
    want = (S, D // 2)
    if cos.shape[1:] != want or cos.shape[0] not in (1, B) or sin.shape != cos.shape:
        raise ValueError(
            f"cos.shape={tuple(cos.shape)}, sin.shape={tuple(sin.shape)}; expected [1 or {B}, "
            f"{S}, {D // 2}] for x of shape {tuple(x.shape)}"
        )
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"cos/sin dtype={cos.dtype}/{sin.dtype}; expected torch.float32")


def coca_prologue_fwd(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, is_key: bool, strict: bool
) -> torch.Tensor:
    """Fused CoCA prologue forward: Q' / Q'' from q, or K' / K'' from t.

    Args:
        x: [B, S, Hx, D] q (is_key False) or t (is_key True); fp16, bf16 or fp32.
        cos, sin: fp32 [1 or B, S, D/2] tables of the rows' positions (times YaRN's factor).
        is_key: key prologue (from t) instead of query prologue (from q).
        strict: strict form (Q'', K'') instead of slack (Q', K').

    Returns:
        [B, S, Hx, D] tensor in x's dtype.
    """
    _check(x, cos, sin)
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    grid, args, meta = _launch_args(x, cos)
    _coca_prologue_fwd_kernel[grid](x, cos, sin, out, *args, IS_KEY=is_key, STRICT=strict, **meta)
    return out


def coca_prologue_bwd(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    grad: torch.Tensor,
    *,
    is_key: bool,
    strict: bool,
) -> torch.Tensor:
    """Fused CoCA prologue backward: dq from dQ' / dQ'', or dt from dK' / dK''.

    Args:
        x: [B, S, Hx, D] the forward input (q or t).
        cos, sin: the forward's fp32 [1 or B, S, D/2] tables.
        grad: [B, S, Hx, D] gradient of the prologue output.
        is_key, strict: as in ``coca_prologue_fwd``.

    Returns:
        [B, S, Hx, D] gradient of x, in x's dtype.
    """
    _check(x, cos, sin)
    if grad.shape != x.shape:
        raise ValueError(f"grad.shape={tuple(grad.shape)}; expected x.shape={tuple(x.shape)}")
    x, cos, sin, grad = x.contiguous(), cos.contiguous(), sin.contiguous(), grad.contiguous()
    dx = torch.empty_like(x)
    grid, args, meta = _launch_args(x, cos)
    _coca_prologue_bwd_kernel[grid](
        x, cos, sin, grad, dx, *args, IS_KEY=is_key, STRICT=strict, **meta
    )
    return dx
