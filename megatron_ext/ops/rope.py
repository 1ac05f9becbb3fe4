"""Rotary position embedding (RoPE), rotate-half form, with linear / dynamic-NTK / YaRN scaling.

Maths: docs/methods/rope.md (rotation and variants). The rotation pairs dim ``i`` with
dim ``i + r/2`` (HF Llama ``rotate_half``); dims ``>= rotary_dim`` pass through unchanged.
Scaling variants only change the inverse frequencies (and, for YaRN, multiply cos and sin by an
attention factor ``a``, so q·k logits scale by ``a**2``).

Precision: angles are the fp32 outer product ``position * inv_freq`` (HF parity), or fp64 when
the input is fp64 so that fp64 identity checks can reach 1e-10. cos/sin are cast to the input
dtype before the rotation, as HF does.

Also here: the interleaved -> rotate-half weight permutation (GPT-J / Cohere2 / Llama-4 checkpoints)
and the Llama-4 NoPE-layer query temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "RopeScaling",
    "apply_rope",
    "interleaved_to_rotate_half_perm",
    "llama4_attn_temperature",
    "permute_interleaved_to_rotate_half",
    "rope_cos_sin",
    "rope_inv_freq",
]

_KINDS = ("linear", "dynamic", "yarn", "llama3")


@dataclass
class RopeScaling:
    """RoPE scaling recipe (docs/methods/rope.md, "Scaling variants").

    Attributes:
        kind: "linear" (position interpolation), "dynamic" (dynamic NTK), "yarn" or "llama3"
            (Llama-3.1: long wavelengths divided by factor, short ones kept, a smooth ramp
            between; docs/methods/rope.md).
        factor: scaling factor (alpha / s). 1 reproduces default RoPE for every kind.
        original_max_position_embeddings: L0, the pretraining length. Required for "dynamic" and
            "yarn"; unused by "linear".
        beta_fast: YaRN high-frequency boundary (rotations per context).
        beta_slow: YaRN low-frequency boundary.
        attention_factor: cos/sin multiplier: YaRN's (inferred from factor / mscale when None),
            or with "linear" a fixed one (ChunkLlama's mscale; None = 1).
        mscale: YaRN numerator mscale (used only together with mscale_all_dim).
        mscale_all_dim: YaRN denominator mscale.
        truncate: YaRN: floor/ceil the correction range (HF default True).
        low_freq_factor: llama3: wavelengths above L0 / low_freq_factor are interpolated.
        high_freq_factor: llama3: wavelengths below L0 / high_freq_factor are kept.
    """

    kind: str
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"RopeScaling.kind={self.kind!r}; expected one of {_KINDS}")
        if not (isinstance(self.factor, int | float) and math.isfinite(self.factor)):
            raise ValueError(f"RopeScaling.factor={self.factor!r}; expected a finite number")
        if self.kind == "linear" and self.factor <= 0:
            raise ValueError(f"RopeScaling.factor={self.factor}; linear scaling needs factor > 0")
        if self.kind in ("dynamic", "yarn", "llama3"):
            if self.factor < 1:
                raise ValueError(
                    f"RopeScaling.factor={self.factor}; {self.kind} scaling needs factor >= 1"
                )
            l0 = self.original_max_position_embeddings
            if l0 is None or not isinstance(l0, int) or l0 < 1:
                raise ValueError(
                    f"RopeScaling.original_max_position_embeddings={l0!r}; {self.kind} scaling "
                    "needs a positive int (the pretraining length L0)"
                )
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                f"RopeScaling low_freq_factor={self.low_freq_factor}, high_freq_factor="
                f"{self.high_freq_factor}; expected high_freq_factor > low_freq_factor > 0"
            )
        if self.kind == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise ValueError(
                f"RopeScaling beta_fast={self.beta_fast}, beta_slow={self.beta_slow}; "
                "expected beta_fast > beta_slow > 0"
            )
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ValueError(
                f"RopeScaling.attention_factor={self.attention_factor}; expected > 0 or None"
            )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"rotary_dim={dim!r}; expected an even int >= 2")


def rope_inv_freq(
    dim: int,
    *,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary dims and the cos/sin attention factor.

    Args:
        dim: rotary dim r (even).
        theta: RoPE base.
        scaling: optional scaling recipe.
        seq_len: current length L for dynamic NTK (ignored by other kinds); required then.
        dtype: float32 (HF parity) or float64.
        device: where to build the tensor.

    Returns:
        (inv_freq [r/2], attention_factor). attention_factor is 1 except for YaRN.
    """
    _check_dim(dim)
    if not theta > 1:
        raise ValueError(f"theta={theta!r}; expected a RoPE base > 1")
    half = dim // 2
    idx = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype)
    inv_freq = 1.0 / (theta ** (idx / dim))
    if scaling is None:
        return inv_freq, 1.0
    if scaling.kind == "linear":  # attention_factor: ChunkLlama's mscale on the tables
        return inv_freq / scaling.factor, float(scaling.attention_factor or 1.0)
    l0 = scaling.original_max_position_embeddings
    if scaling.kind == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_wl, high_wl = l0 / scaling.low_freq_factor, l0 / scaling.high_freq_factor
        ramp = (l0 / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smooth = (1 - ramp) * inv_freq / scaling.factor + ramp * inv_freq
        out = torch.where(wavelen > low_wl, inv_freq / scaling.factor, inv_freq)
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smooth, out), 1.0
    if scaling.kind == "dynamic":
        if seq_len is None:
            raise ValueError("seq_len=None; dynamic NTK needs the current length L")
        if seq_len > l0:
            a = scaling.factor
            base = theta * (a * seq_len / l0 - (a - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** (idx / dim))
        return inv_freq, 1.0
    # YaRN: blend interpolated (low-frequency) and extrapolated (high-frequency) dims.
    s = scaling.factor

    def corr(n_rot: float) -> float:
        return dim * math.log(l0 / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = corr(scaling.beta_fast), corr(scaling.beta_slow)
    if scaling.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(half, dtype=dtype, device=device) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # gamma: 1 keeps the original frequency (extrapolation)
    inv_freq = (inv_freq / s) * (1 - keep) + inv_freq * keep
    if scaling.attention_factor is not None:
        attn = float(scaling.attention_factor)
    elif scaling.mscale and scaling.mscale_all_dim:
        attn = _yarn_mscale(s, scaling.mscale) / _yarn_mscale(s, scaling.mscale_all_dim)
    else:
        attn = _yarn_mscale(s)
    return inv_freq, attn


def _check_positions(positions: torch.Tensor) -> None:
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point:
        got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions)
        raise ValueError(f"positions dtype={got}; expected an integer tensor")
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions.shape={tuple(positions.shape)}; expected [S] or [B, S]")


def rope_cos_sin(
    positions: torch.Tensor,
    dim: int,
    *,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    dtype: torch.dtype = torch.float32,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotate-half RoPE (HF layout: the r/2 angles repeated twice).

    Args:
        positions: int tensor [S] or [B, S] of 0-based (per-document) positions.
        dim: rotary dim r (even).
        theta: RoPE base.
        scaling: optional scaling recipe. YaRN's attention factor multiplies cos and sin.
        dtype: output dtype. Angles are computed in fp64 if dtype is fp64, else fp32.
        seq_len: dynamic NTK only: the length L that sets theta'. Default: max(positions) + 1 of
            this call (HF behaviour). Pass the planned total length when decoding with a cache
            so that decode matches a full forward (docs/methods/rope.md, "Dynamic NTK").

    Returns:
        (cos, sin), each [*positions.shape, r] in ``dtype``.
    """
    _check_positions(positions)
    ang_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if scaling is not None and scaling.kind == "dynamic" and seq_len is None:
        seq_len = int(positions.max().item()) + 1 if positions.numel() else 0
    inv_freq, attn = rope_inv_freq(
        dim, theta=theta, scaling=scaling, seq_len=seq_len, dtype=ang_dtype, device=positions.device
    )
    freqs = positions.to(ang_dtype).unsqueeze(-1) * inv_freq  # [..., r/2], one rounding (HF)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attn != 1.0:
        cos, sin = cos * attn, sin * attn
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    theta: float = 10000.0,
    rotary_dim: int | None = None,
    scaling: RopeScaling | None = None,
    inverse: bool = False,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Rotate x by its positions (rotate-half pairing); differentiable w.r.t. x.

    ``y[i] = x[i] c_i - x[i+h] s_i``, ``y[i+h] = x[i+h] c_i + x[i] s_i`` for i < h = r/2, with
    c, s = cos, sin of ``position * inv_freq_i`` (times YaRN's attention factor). Dims >= r pass
    through.

    Args:
        x: [B, S, H, D] (any float dtype).
        positions: int tensor [S] (shared by the batch) or [B, S].
        theta: RoPE base.
        rotary_dim: r, even, <= D. Default D.
        scaling: optional RopeScaling.
        inverse: apply the transpose of the forward map (rotation by -position, still times the
            YaRN factor a). It undoes the forward exactly when a = 1 and is the exact backward
            of the forward map in every case (used in backward prologues).
        seq_len: dynamic NTK length L; default max(positions) + 1 (see ``rope_cos_sin``).

    Returns:
        [B, S, H, D] tensor, same dtype as x.
    """
    if x.dim() != 4:
        raise ValueError(f"x.shape={tuple(x.shape)}; expected [B, S, H, D]")
    B, S, _, D = x.shape
    r = D if rotary_dim is None else rotary_dim
    _check_dim(r)
    if r > D:
        raise ValueError(f"rotary_dim={r}; expected <= head dim D={D}")
    _check_positions(positions)
    if positions.shape[-1] != S or (positions.dim() == 2 and positions.shape[0] not in (1, B)):
        raise ValueError(
            f"positions.shape={tuple(positions.shape)}; expected [{S}] or [{B}, {S}] for x "
            f"of shape {tuple(x.shape)}"
        )
    cos, sin = rope_cos_sin(
        positions.to(x.device), r, theta=theta, scaling=scaling, dtype=x.dtype, seq_len=seq_len
    )
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [(B,) S, 1, r], broadcast over heads
    if inverse:
        sin = -sin
    xr = x[..., :r]
    y = xr * cos + _rotate_half(xr) * sin
    return y if r == D else torch.cat((y, x[..., r:]), dim=-1)


def interleaved_to_rotate_half_perm(dim: int, *, rotary_dim: int | None = None) -> torch.Tensor:
    """Index permutation taking a head's dims from interleaved to rotate-half pairing.

    ``new = old[perm]`` gives ``new[i] = old[2i]``, ``new[i + r/2] = old[2i + 1]`` for i < r/2;
    dims >= r keep their place. Apply it to the per-head output rows of W_q and W_k (and CoCA's
    W_t, per-dim q/k norm weights); scores are unchanged because q and k move alike.

    Args:
        dim: head dim D.
        rotary_dim: r (even, <= D). Default D.

    Returns:
        int64 tensor [D].
    """
    r = dim if rotary_dim is None else rotary_dim
    _check_dim(r)
    if r > dim:
        raise ValueError(f"rotary_dim={r}; expected <= head dim {dim}")
    return torch.cat(
        (torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, dim)), dim=0
    ).long()


def permute_interleaved_to_rotate_half(
    weight: torch.Tensor, num_heads: int, head_dim: int, *, rotary_dim: int | None = None
) -> torch.Tensor:
    """Permute the output rows of a q/k projection weight from interleaved to rotate-half.

    Args:
        weight: [num_heads * head_dim, ...] (a Linear weight or bias).
        num_heads: heads in the projection.
        head_dim: D.
        rotary_dim: r, default D.

    Returns:
        Tensor with the same shape as weight.
    """
    if weight.shape[0] != num_heads * head_dim:
        raise ValueError(
            f"weight.shape[0]={weight.shape[0]}; expected num_heads*head_dim="
            f"{num_heads}*{head_dim}={num_heads * head_dim}"
        )
    perm = interleaved_to_rotate_half_perm(head_dim, rotary_dim=rotary_dim).to(weight.device)
    w = weight.reshape(num_heads, head_dim, *weight.shape[1:])
    return w[:, perm].reshape(weight.shape)


def llama4_attn_temperature(
    positions: torch.Tensor,
    floor_scale: float = 8192,
    attn_scale: float = 0.1,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Llama-4 NoPE-layer query temperature ``1 + attn_scale * ln(1 + floor((p+1)/floor_scale))``.

    Multiply each query (not keys) by it; the usual 1/sqrt(D) softmax scale still applies
    (docs/methods/rope.md, "Llama-4 NoPE temperature"). Factor = 1 for p <= floor_scale - 2.

    Args:
        positions: int tensor of absolute per-document positions, any shape.
        floor_scale: positions per temperature step (8192).
        attn_scale: temperature coefficient (0.1), not the softmax scale.
        dtype: output dtype.

    Returns:
        Tensor of positions.shape in ``dtype``.
    """
    if not floor_scale > 0:
        raise ValueError(f"floor_scale={floor_scale!r}; expected > 0")
    if positions.dtype.is_floating_point:
        raise ValueError(f"positions dtype={positions.dtype}; expected an integer tensor")
    p = positions.to(torch.float64)
    return (1.0 + attn_scale * torch.log1p(torch.floor((p + 1.0) / floor_scale))).to(dtype)
