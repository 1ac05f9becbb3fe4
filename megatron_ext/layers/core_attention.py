"""Megatron-core core-attention modules that run megatron_ext.ops.

They replace the stock `DotProductAttention` in a layer spec. Megatron hands them q, k, v as
`[S, B, heads, D]` (heads local to this tensor-parallel rank); they convert once to the ops'
`[B, S, heads, D]`, apply positions themselves at the *absolute, per-document* positions the
caller passes, and return `[S, B, heads * D]`.

Positions and document ids travel through GPTModel's `attention_mask` argument, which Megatron
forwards untouched to the core attention: pass a `SequenceInfo` (or None for one document per
row at positions 0..S-1). None of these modules touch CUDA-only Megatron helpers (global memory
buffer, CUDA RNG tracker), so they run on CPU as well as GPU.

`ExtCoreAttention` serves the rope / nope / hybrid variants: per layer (resolved from
`ExtTransformerConfig.layer_attention`) RoPE or NoPE, full / sliding-window / chunked-local, the
Llama-4 query temperature on NoPE layers and the Llama-4 L2 QK-norm after RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_ext.layers.transformer_config import ExtTransformerConfig, LayerAttention
from megatron_ext.ops import apply_rope, attention_func
from megatron_ext.ops.qk_norm import l2_norm_post_rope
from megatron_ext.ops.rope import llama4_attn_temperature
from megatron_ext.parallel import CPLayout, cp_attn_func

_PLAN_OF_COMM_TYPE = {"p2p": "ring", "all_gather": "allgather", "a2a": "a2a"}


@dataclass
class SequenceInfo:
    """Per-token absolute per-document positions and document ids of a batch, both [B, S].

    `seq_len` (optional) fixes the length used by length-dependent rules (dynamic NTK, DCA
    temperature); by default they use what the batch shows.
    """

    positions: torch.Tensor
    doc_ids: torch.Tensor | None = None
    seq_len: int | None = None
    cp_layout: CPLayout | None = None
    """Context parallelism: where every token of the global batch lives (this rank holds its
    shard; positions above are then the shard's, -1 on padding slots)."""


def chunk_run_ids(positions: torch.Tensor, doc_ids: torch.Tensor | None, chunk: int
                  ) -> torch.Tensor:
    """Ids whose maximal runs are the Llama-4 attention chunks of each document.

    Chunked-local attention is causal attention restricted to one (document, position // chunk)
    run, so it is expressed as document masking on these ids, using absolute per-document
    positions (a document continued from an earlier sample keeps its chunk grid).
    """
    block = torch.div(positions, chunk, rounding_mode="floor")
    if doc_ids is None:
        return block
    return doc_ids.long() * (int(block.max()) + 2) + block


class _OpsCoreAttention(MegatronModule):
    """Shared plumbing: argument checks, layout conversion, SequenceInfo unpacking."""

    def __init__(
        self,
        config: ExtTransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if not isinstance(config, ExtTransformerConfig):
            raise TypeError(f"{type(self).__name__} needs an ExtTransformerConfig, got "
                            f"{type(config).__name__}")
        if attention_type != "self":
            raise ValueError(f"attention_type={attention_type!r}: only self-attention")
        self.cp_group = None
        if config.context_parallel_size > 1:
            cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
            if cp is None:
                from megatron.core import parallel_state as ps

                cp = ps.get_context_parallel_group()
            self.cp_group = cp
        # Megatron's cp_comm_type names -> our plans (window / chunked layers always use halo)
        self.cp_plan = _PLAN_OF_COMM_TYPE.get(cp_comm_type) if cp_comm_type else None
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        if p:
            raise ValueError(f"attention_dropout={p}: not supported by these kernels; use 0")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.layer: LayerAttention = config.layer_attention(layer_number)
        self.rope_scaling = config.rope_scaling_ops()  # resolved once, not per forward

    def _inputs(self, query, key, value, attention_mask, packed_seq_params, attention_bias=None):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params (thd) is not supported; pass a SequenceInfo "
                             "with doc_ids as attention_mask instead")
        if attention_mask is not None and not isinstance(attention_mask, SequenceInfo):
            raise TypeError(
                f"attention_mask must be a megatron_ext SequenceInfo or None, got "
                f"{type(attention_mask).__name__}: masks are built from positions and doc_ids")
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [B, S, heads, D]
        B, S = q.shape[:2]
        info = attention_mask
        if info is None:
            info = SequenceInfo(torch.arange(S, device=q.device).expand(B, S))
        if info.positions.shape != (B, S):
            raise ValueError(f"SequenceInfo.positions shape {tuple(info.positions.shape)}; "
                             f"expected {(B, S)}")
        doc_ids = info.doc_ids if self.config.mask_documents else None
        if self.cp_group is not None and info.cp_layout is None:
            raise ValueError(
                f"context_parallel_size={self.config.context_parallel_size}: the SequenceInfo "
                "must carry the batch's cp_layout (megatron_ext.parallel.batch.cp_shard_batch)")
        return q, k, v, info, doc_ids

    def _cp_attention(self, q, k, v, info: SequenceInfo, attn: str, **kwargs) -> torch.Tensor:
        """Context-parallel attention of this rank's shard (the plan owns the communication)."""
        plan = None if attn in ("window", "chunked") else self.cp_plan
        return cp_attn_func(q, k, v, group=self.cp_group, attn=attn, plan=plan,
                            layout=info.cp_layout, softmax_scale=self.softmax_scale, **kwargs)

    @staticmethod
    def _output(out: torch.Tensor) -> torch.Tensor:
        S, B = out.shape[1], out.shape[0]
        return out.transpose(0, 1).reshape(S, B, -1)


class ExtCoreAttention(_OpsCoreAttention):
    """RoPE / NoPE attention, full, sliding-window or chunked-local, per layer."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        q, k, v, info, doc_ids = self._inputs(query, key, value, attention_mask,
                                              packed_seq_params, attention_bias)
        cfg, layer = self.config, self.layer
        pos = info.positions.clamp(min=0)  # CP padding slots (-1) are never visible
        if layer.rope:
            rot = {"theta": cfg.rotary_base, "scaling": self.rope_scaling,
                   "rotary_dim": int(cfg.kv_channels * cfg.rotary_percent),
                   "seq_len": info.seq_len}
            q, k = apply_rope(q, pos, **rot), apply_rope(k, pos, **rot)
            if layer.qk_l2_norm:
                q = l2_norm_post_rope(q, cfg.layernorm_epsilon)
                k = l2_norm_post_rope(k, cfg.layernorm_epsilon)
        elif layer.temperature is not None:
            floor_scale, attn_scale = layer.temperature
            factor = llama4_attn_temperature(pos, floor_scale=floor_scale, attn_scale=attn_scale)
            q = q * factor.to(q.dtype)[..., None, None]
        if self.cp_group is not None:
            if layer.window is not None:
                out = self._cp_attention(q, k, v, info, "window", window=layer.window)
            elif layer.chunk is not None:
                out = self._cp_attention(q, k, v, info, "chunked", chunk=layer.chunk)
            else:
                out = self._cp_attention(q, k, v, info, "plain")
            return self._output(out)
        if layer.chunk is not None:
            doc_ids = chunk_run_ids(pos, doc_ids, layer.chunk)
        out, _ = attention_func(q, k, v, causal=True, window=layer.window,
                                softmax_scale=self.softmax_scale, doc_ids=doc_ids)
        return self._output(out)


__all__ = ["ExtCoreAttention", "SequenceInfo", "chunk_run_ids"]
