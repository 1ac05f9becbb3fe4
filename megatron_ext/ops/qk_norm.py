"""Per-head query/key normalisations (docs/methods/rope.md, "QK normalisation").

- ``l2_norm_post_rope``: Llama-4 ``Llama4TextL2Norm``, ``x / sqrt(mean(x^2) + eps)`` over the head
  dim, no weight, applied *after* RoPE on RoPE layers only (eps = the model's ``rms_norm_eps``).
- ``head_layer_norm``: LayerNorm (or RMSNorm) over the head dim with an optional per-dim weight
  and bias shared by all heads, applied *before* RoPE (``layernorm_pre_rope``; Megatron's
  ``qk_layernorm``).

Both compute in fp32 (fp64 stays fp64) and return the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["head_layer_norm", "l2_norm_post_rope"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def l2_norm_post_rope(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama-4 QK L2 norm: ``x * rsqrt(mean(x**2, -1) + eps)``.

    Args:
        x: [..., D] (typically q or k [B, S, H, D], already rotated).
        eps: added to the mean square (> 0).

    Returns:
        Tensor of x's shape and dtype.
    """
    if not eps > 0:
        raise ValueError(f"eps={eps!r}; expected > 0")
    xf = x.to(_compute_dtype(x))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def head_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    kind: str = "layernorm",
) -> torch.Tensor:
    """Normalise every head vector over D (pre-RoPE QK norm).

    Args:
        x: [B, S, H, D].
        weight: optional [D] scale shared by the heads.
        bias: optional [D] shift (layernorm only).
        eps: variance epsilon (> 0).
        kind: "layernorm" (mean and variance) or "rmsnorm" (mean square only).

    Returns:
        Tensor of x's shape and dtype.
    """
    if kind not in ("layernorm", "rmsnorm"):
        raise ValueError(f"kind={kind!r}; expected 'layernorm' or 'rmsnorm'")
    if not eps > 0:
        raise ValueError(f"eps={eps!r}; expected > 0")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (D,):
            raise ValueError(f"{name}.shape={tuple(t.shape)}; expected [D] = [{D}]")
    if kind == "rmsnorm" and bias is not None:
        raise ValueError("bias is not None; rmsnorm has no bias")
    cdt = _compute_dtype(x)
    xf = x.to(cdt)
    w = None if weight is None else weight.to(cdt)
    if kind == "layernorm":
        b = None if bias is None else bias.to(cdt)
        return F.layer_norm(xf, (D,), w, b, eps).to(x.dtype)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y if w is None else y * w).to(x.dtype)
