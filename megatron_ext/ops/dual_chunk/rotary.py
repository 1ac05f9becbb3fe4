"""Rotate-half RoPE for DCA's four rotations (three query copies, one key rotation).

Same maths and tables as ``rope.apply_rope`` (``rope_cos_sin``, HF pairing, docs/methods/rope.md),
written with two fused multiply-adds per half instead of a concatenated ``rotate_half``,
and with a backward that is the transposed rotation (sin -> -sin) instead of autograd through
the elementwise graph. DCA rotates q three times, so the rotation is a visible share of its
cost next to the attention passes.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.rope import RopeScaling, rope_cos_sin

__all__ = ["rope_tables", "rotate", "rotate_by_tables"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """y1 = x1 c - x2 s, y2 = x2 c + x1 s on the halves of the first r = 2 * cos.shape[-1] dims
    of the last dim (r = D: the whole head); dims >= r are copied (partial rotary)."""
    h = cos.shape[-1]
    x1, x2 = x[..., :h], x[..., h : 2 * h]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    y1, y2 = y[..., :h], y[..., h : 2 * h]
    if 2 * h < x.shape[-1]:
        y[..., 2 * h :] = x[..., 2 * h :]
    torch.mul(x1, cos, out=y1)
    y1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=y2)
    y2.addcmul_(x1, sin)
    return y


class _RotateFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, -sin), None, None


def rope_tables(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    seq_len: int | None = None,
    rotary_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width cos and sin tables for rotating x [B, S, H, D] at ``positions``.

    ``scaling`` / ``seq_len``: RoPE frequency scaling and the dynamic-NTK length L (the
    batch's, not the remapped positions': DCA changes positions, not frequencies).
    ``rotary_dim``: r, the rotated dims of each head (default D); the tables are [.., r/2].

    Returns:
        (cos, sin), each [S, 1, D/2], [B, S, 1, D/2] or, when every position is the same (the
        inter pass), [1, 1, D/2]; in x's dtype, angles as in ``rope_cos_sin``.
    """
    B, S, _, D = x.shape
    r = D if rotary_dim is None else rotary_dim
    if r % 2 or not 2 <= r <= D:
        raise ValueError(f"rotary_dim={r} for head dim D={D}; expected an even r in [2, D]")
    if positions.shape not in ((S,), (B, S), (1, S)):
        raise ValueError(f"positions.shape={tuple(positions.shape)}; expected [{S}] or [{B}, {S}]")
    pos = positions
    if pos.device.type == "cpu" and pos.numel() and bool((pos == pos.flatten()[0]).all()):
        pos = pos.flatten()[:1]  # one position for every row: broadcast (checked on the host)
    pos = pos.to(x.device)
    if scaling is not None and scaling.kind == "dynamic" and seq_len is None:
        raise ValueError("dynamic NTK scaling needs seq_len (the batch length L) in DCA")
    cos, sin = rope_cos_sin(pos, r, theta=theta, dtype=x.dtype, scaling=scaling, seq_len=seq_len)
    return cos[..., : r // 2].unsqueeze(-2), sin[..., : r // 2].unsqueeze(-2)


def rotate_by_tables(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False
) -> torch.Tensor:
    """Rotate x [B, S, H, D] with tables from ``rope_tables``; ``inverse`` applies R^T.

    Not differentiable (used inside autograd Functions that recompute it).
    """
    return _rotate(x, cos, -sin if inverse else sin)


def rotate(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    seq_len: int | None = None,
    rotary_dim: int | None = None,
) -> torch.Tensor:
    """Rotate x [B, S, H, D] by RoPE at ``positions`` ([S] or [B, S] ints); differentiable.

    Equals ``apply_rope(x, positions, theta=theta, scaling=scaling, seq_len=seq_len,
    rotary_dim=rotary_dim)``.
    """
    cos, sin = rope_tables(x, positions, theta=theta, scaling=scaling, seq_len=seq_len,
                           rotary_dim=rotary_dim)
    return _RotateFunc.apply(x, cos, sin)
