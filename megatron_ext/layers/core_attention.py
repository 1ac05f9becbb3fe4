"""Megatron-core core-attention modules that run megatron_ext's attention methods.

They replace the stock `DotProductAttention` in a layer spec. Each module builds its layer's
method once, in `__init__` (`RopeAttention`, `DualChunkAttention` or `CoCAAttention` from
`megatron_ext.ops`, configured from `ExtTransformerConfig` for this layer number), and runs it
either on this process or, when the model is context parallel, through
`megatron_ext.parallel.ContextParallel`: parallelism is applied from outside, the method code
has no CP branch. Megatron hands q, k, v as `[S, B, heads, D]` (heads local to this
tensor-parallel rank); they are converted once to the ops' `[B, S, heads, D]` and the output
goes back as `[S, B, heads * D]`.

Where the tokens are (absolute per-document positions, document ids, a fixed length, the CP
layout) travels in Megatron's own slot for sequence structure, `packed_seq_params`, as a
`SequenceInfo` (a `PackedSeqParams` with `qkv_format="sbhd"`, which Megatron forwards untouched
to the core attention). `SequenceInfo.batch_meta` derives the per-batch metadata once and every
layer reuses it. `megatron_ext.layers.forward.gpt_forward` builds it; None means one document
per row at positions 0..S-1. No CUDA-only Megatron helpers are used, so the modules run on CPU
and GPU alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_ext.layers.transformer_config import ExtTransformerConfig, LayerAttention
from megatron_ext.ops import BatchMeta, Rope, RopeAttention, rope_length, token_meta
from megatron_ext.ops.method import AttentionMethod
from megatron_ext.parallel import ContextParallel, CPLayout, cp_batch

_PLAN_OF_COMM_TYPE = {"p2p": "ring", "all_gather": "allgather", "a2a": "a2a"}


@dataclass
class SequenceInfo(PackedSeqParams):
    """Per-token positions and documents of a batch, passed as GPTModel's `packed_seq_params`.

    `positions` are absolute per-document positions [B, S] (under context parallelism this
    rank's shard, -1 on padding slots); `doc_ids` [B, S] document ids or None; `seq_len` fixes
    the length of length-dependent rules (dynamic NTK, DCA temperature; default what the batch
    shows); `cp_layout` is where every token of the global batch lives under context
    parallelism (`megatron_ext.parallel.batch.cp_shard_batch`).
    """

    qkv_format: str = "sbhd"
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    seq_len: int | None = None
    cp_layout: CPLayout | None = None
    _batch: dict = field(default_factory=dict, repr=False, compare=False)

    def batch_meta(self, batch: int, *, mask_documents: bool, cp_rank: int = 0) -> BatchMeta:
        """The per-batch metadata every layer uses, derived on first use and then reused."""
        key = (batch, mask_documents, cp_rank)
        if key not in self._batch:
            if self.cp_layout is not None:
                meta = cp_batch(self.cp_layout, cp_rank, batch, seq_len=self.seq_len)
            else:
                pos = self.positions.detach().cpu()
                docs = self.doc_ids.detach().cpu() if (mask_documents and self.doc_ids
                                                       is not None) else None
                meta = BatchMeta(token_meta(pos, docs, seq_len=self.seq_len),
                                 rope_length([pos], self.seq_len))
            self._batch[key] = meta
        return self._batch[key]


class _OpsCoreAttention(MegatronModule):
    """Shared plumbing: argument checks, the method built once, layout conversion."""

    def __init__(
        self,
        config: ExtTransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
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
        _check_mask_type(attn_mask_type)
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        if p:
            raise ValueError(f"attention_dropout={p}: not supported by these kernels; use 0")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.layer: LayerAttention = config.layer_attention(layer_number)
        self.rope_scaling = config.rope_scaling_ops()  # resolved once, not per forward
        self.method = self.build_method()
        self.cp_group, self.cp_rank = None, 0
        self.attend = self.method.run
        if config.context_parallel_size > 1:
            cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
            if cp is None:
                from megatron.core import parallel_state as ps

                cp = ps.get_context_parallel_group()
            self.cp_group, self.cp_rank = cp, torch.distributed.get_rank(cp)
            plan = None  # window / chunked layers: the halo plan
            if self.method.default_plan == "ring" and cp_comm_type:
                plan = _PLAN_OF_COMM_TYPE.get(cp_comm_type, cp_comm_type)
            self.attend = ContextParallel(self.method, cp, plan,
                                          plan_key="parallel.cp_algorithm").run

    def build_method(self) -> AttentionMethod:
        """This layer's attention method (subclasses)."""
        raise NotImplementedError

    def _rope(self) -> Rope:
        cfg = self.config
        return Rope(theta=cfg.rotary_base, rotary_dim=int(cfg.kv_channels * cfg.rotary_percent),
                    scaling=self.rope_scaling)

    def _plain_method(self) -> RopeAttention:
        """RoPE / NoPE attention with this layer's mask, temperature and QK-norm."""
        layer = self.layer
        return RopeAttention(
            rope=self._rope() if layer.rope else None, window=layer.window, chunk=layer.chunk,
            temperature=None if layer.rope else layer.temperature,
            qk_l2_norm_eps=self.config.layernorm_epsilon if layer.qk_l2_norm else None,
            softmax_scale=self.softmax_scale,
        )  # fmt: skip

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        if attention_mask is not None:
            raise TypeError(
                f"attention_mask={type(attention_mask).__name__}: masks are built from positions "
                "and document ids; pass a megatron_ext SequenceInfo as packed_seq_params "
                "(megatron_ext.layers.forward.gpt_forward does) and attention_mask=None")
        if attn_mask_type is not None:
            _check_mask_type(attn_mask_type)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [B, S, heads, D]
        B, S = q.shape[:2]
        info = packed_seq_params
        if info is None:
            info = SequenceInfo(positions=torch.arange(S).expand(B, S))
        if not isinstance(info, SequenceInfo):
            raise TypeError(
                f"packed_seq_params={type(info).__name__}: these layers take a megatron_ext "
                "SequenceInfo (qkv_format 'sbhd', positions and document ids), not thd packing")
        if self.cp_group is not None and info.cp_layout is None:
            raise ValueError(
                f"context_parallel_size={self.config.context_parallel_size}: the SequenceInfo "
                "must carry the batch's cp_layout (megatron_ext.parallel.batch.cp_shard_batch)")
        if info.cp_layout is None and tuple(info.positions.shape) != (B, S):
            raise ValueError(f"SequenceInfo.positions shape {tuple(info.positions.shape)}; "
                             f"expected {(B, S)}")
        batch = info.batch_meta(B, mask_documents=self.config.mask_documents,
                                cp_rank=self.cp_rank)
        out = self.attend(q, k, v, batch)
        return out.transpose(0, 1).reshape(S, B, -1)


def _check_mask_type(mask_type) -> None:
    if mask_type not in (AttnMaskType.causal, "causal"):
        raise ValueError(
            f"attn_mask_type={mask_type}: megatron_ext attention is causal within documents "
            "(AttnMaskType.causal); padding and arbitrary masks come from positions (-1) and "
            "document ids in the SequenceInfo")


class ExtCoreAttention(_OpsCoreAttention):
    """RoPE / NoPE attention, full, sliding-window or chunked-local, per layer."""

    def build_method(self) -> AttentionMethod:
        return self._plain_method()


__all__ = ["ExtCoreAttention", "SequenceInfo"]
