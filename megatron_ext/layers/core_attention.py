"""A Megatron-core core-attention module that runs megatron_ext.ops (plain RoPE / NoPE).

It replaces the stock `DotProductAttention` in a layer spec. Megatron hands it q, k, v in
`[S, B, H, D]`; it converts once to the ops' `[B, S, H, D]`, applies RoPE at the *absolute,
per-document* positions the caller passes (so packed documents and, later, context-parallel
shards get their own positions) and calls `attention_func`, which masks across documents.

Positions and document ids travel through GPTModel's `attention_mask` argument, which Megatron
forwards untouched to the core attention: pass a `SequenceInfo` there (or None for one document
per row at positions 0..S-1). The module never touches CUDA-only Megatron helpers (global memory
buffer, CUDA RNG tracker), so it runs on CPU as well as GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_ext.ops import apply_rope, attention_func


@dataclass
class SequenceInfo:
    """Per-token positions and document ids of a (packed) batch, both [B, S] int64."""

    positions: torch.Tensor
    doc_ids: torch.Tensor | None = None


class ExtCoreAttention(MegatronModule):
    """Causal attention with optional RoPE, at explicit positions, masked per document.

    Spec params: `rope` (apply RoPE or NoPE), `rope_theta`, `mask_documents`.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        rope: bool = True,
        rope_theta: float = 10000.0,
        mask_documents: bool = True,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size}: ExtCoreAttention is the "
                "single-rank attention; context parallelism is not implemented yet"
            )
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        if p:
            raise ValueError(f"attention_dropout={p}: not supported by these kernels; use 0")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.rope = rope
        self.rope_theta = rope_theta
        self.mask_documents = mask_documents

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: SequenceInfo | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params (thd) is not supported; pass a SequenceInfo "
                             "with doc_ids as attention_mask instead")
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [B, S, H, D]
        S, B = query.shape[0], query.shape[1]
        info = attention_mask if isinstance(attention_mask, SequenceInfo) else None
        if info is not None:
            positions, doc_ids = info.positions, info.doc_ids
        else:
            positions = torch.arange(S, device=q.device).expand(B, S)
            doc_ids = None
        if self.rope:
            q = apply_rope(q, positions, theta=self.rope_theta)
            k = apply_rope(k, positions, theta=self.rope_theta)
        out, _ = attention_func(q, k, v, causal=True, softmax_scale=self.softmax_scale,
                                doc_ids=doc_ids if self.mask_documents else None)
        return out.transpose(0, 1).reshape(S, B, -1)
