"""RoPE / NoPE attention with sliding-window or chunked-local masks: the hybrid layer's method.

One layer of a RoPE, NoPE or hybrid (Cohere2 / Llama-4 / SmolLM3 pattern) model is: rotate q
and k at their per-document positions (or not, on NoPE layers), optionally L2-normalise them
after RoPE (Llama-4 QK-norm), or scale NoPE queries by the Llama-4 temperature
``1 + attn_scale * ln(1 + floor((p + 1) / floor_scale))``, then exact causal attention under
the layer's mask (full, sliding window W: ``p_i - W < p_j <= p_i``, chunked-local c: same
``p // c``), inside each document. Maths: docs/methods/rope_nope.md.

``RopeAttention`` is the method object (prologue + block) layers and context parallelism use;
``rope_attn_func`` is the public op with explicit positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ext.ops.meta import Meta, token_meta
from megatron_ext.ops.method import GENERIC_PLANS, AttentionMethod
from megatron_ext.ops.qk_norm import l2_norm_post_rope
from megatron_ext.ops.rope import RopeScaling, apply_rope, llama4_attn_temperature

__all__ = ["Rope", "RopeAttention", "rope_attn_func"]


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of a layer."""

    theta: float = 10000.0
    """Base."""
    rotary_dim: int | None = None
    """Rotated dims per head (partial rotary); None = the whole head."""
    scaling: RopeScaling | None = None
    """Linear / dynamic NTK / YaRN frequency scaling."""


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r}; expected None or an int >= 1")


class RopeAttention(AttentionMethod):
    """RoPE or NoPE attention with a full, sliding-window or chunked-local causal mask.

    Args:
        rope: the rotary embedding, or None for a NoPE layer.
        causal: causal mask (window and chunk need it).
        window: sliding window W (HF ``sliding_window``: W keys including the query).
        chunk: chunked-local size c (Llama-4 ``attention_chunk_size``).
        temperature: (floor_scale, attn_scale) of the Llama-4 query temperature; NoPE only.
        qk_l2_norm_eps: L2-normalise q and k after RoPE with this epsilon; RoPE only.
        softmax_scale: default 1/sqrt(D).
    """

    def __init__(
        self,
        *,
        rope: Rope | None,
        causal: bool = True,
        window: int | None = None,
        chunk: int | None = None,
        temperature: tuple[float, float] | None = None,
        qk_l2_norm_eps: float | None = None,
        softmax_scale: float | None = None,
    ) -> None:
        _check_size("window", window)
        _check_size("chunk", chunk)
        if not causal and (window is not None or chunk is not None):
            raise ValueError(f"causal=False with window={window}, chunk={chunk}; those masks "
                             "are causal")
        if temperature is not None and rope is not None:
            raise ValueError("temperature (Llama-4 temperature tuning) applies to NoPE layers "
                             "only; got a RoPE layer")
        if qk_l2_norm_eps is not None and rope is None:
            raise ValueError("qk_l2_norm_eps (Llama-4 QK-norm after RoPE) needs a RoPE layer")
        self.rope, self.causal, self.window, self.chunk = rope, causal, window, chunk
        self.temperature, self.qk_l2_norm_eps = temperature, qk_l2_norm_eps
        self.softmax_scale = softmax_scale
        if window is not None or chunk is not None:
            self.name = "window" if window is not None else "chunked"
            self.plans, self.default_plan = ("halo", "local", *GENERIC_PLANS), "halo"
        else:
            self.name = "plain"

    def _rotate(self, x: torch.Tensor, meta: Meta, rope_len: int) -> torch.Tensor:
        assert self.rope is not None
        pos = meta.positions.clamp(min=0).to(x.device)  # padding slots are never visible
        x = apply_rope(x, pos, theta=self.rope.theta, rotary_dim=self.rope.rotary_dim,
                       scaling=self.rope.scaling, seq_len=rope_len)
        if self.qk_l2_norm_eps is not None:
            x = l2_norm_post_rope(x, self.qk_l2_norm_eps)
        return x

    def prepare_q(self, q: torch.Tensor, meta: Meta, rope_len: int) -> torch.Tensor:
        if self.rope is not None:
            return self._rotate(q, meta, rope_len)
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            pos = meta.positions.clamp(min=0).to(q.device)
            dt = torch.float64 if q.dtype == torch.float64 else torch.float32
            factor = llama4_attn_temperature(pos, floor_scale=floor_scale, attn_scale=attn_scale,
                                             dtype=dt)
            return q * factor.to(q.dtype)[..., None, None]
        return q

    def prepare_kv(
        self, k: torch.Tensor, v: torch.Tensor, meta: Meta, rope_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (k if self.rope is None else self._rotate(k, meta, rope_len)), v


def rope_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    q_doc_ids: torch.Tensor | None = None,
    k_doc_ids: torch.Tensor | None = None,
    rope: Rope | None = None,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    temperature: tuple[float, float] | None = None,
    qk_l2_norm_eps: float | None = None,
    softmax_scale: float | None = None,
    seq_len: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RoPE / NoPE attention at explicit per-document positions; exact forward and backward.

    Key j is visible to query i when both are in the same document and the mask allows it on
    their *positions* (causal ``p_j <= p_i``; window, chunk as in ``RopeAttention``). Negative
    positions mark padding (never visible; a padding query gets out 0).

    Args:
        q: [B, Sq, H, D] un-rotated queries. k, v: [B, Sk, Hkv, D] (k un-rotated); H % Hkv == 0.
        q_positions, k_positions: int [S] or [B, S] per-document positions.
        q_doc_ids, k_doc_ids: optional int document ids of the same shapes (both or neither).
        rope, causal, window, chunk, temperature, qk_l2_norm_eps, softmax_scale: the layer
            (``RopeAttention``).
        seq_len: dynamic-NTK length; default max(position) + 1 over queries and keys.
        return_lse: also return the lse [B, H, Sq].

    Returns:
        out [B, Sq, H, D] in v's dtype (and lse, fp32; fp64 for fp64 inputs).
    """
    if (q_doc_ids is None) != (k_doc_ids is None):
        raise ValueError("q_doc_ids and k_doc_ids: give both or neither")
    method = RopeAttention(
        rope=rope, causal=causal, window=window, chunk=chunk, temperature=temperature,
        qk_l2_norm_eps=qk_l2_norm_eps, softmax_scale=softmax_scale,
    )  # fmt: skip
    B = q.shape[0]
    qm = token_meta(q_positions, q_doc_ids, batch=B)
    km = token_meta(k_positions, k_doc_ids, batch=B)
    rope_len = None if seq_len is None else int(seq_len)
    return method(q, k, v, q_meta=qm, k_meta=km, rope_len=rope_len, return_lse=return_lse)
