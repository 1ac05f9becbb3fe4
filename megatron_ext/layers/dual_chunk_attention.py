"""`DualChunkCoreAttention`: Dual Chunk Attention as a Megatron-core core attention.

On RoPE layers the keys are rotated once at `j mod C` (`dca_rotate_keys`) and the queries follow
the intra / successive / inter rule of ../shared/METHODS.md section 5 through `dual_chunk_block`
(exact gradients: partial results meet in the differentiable merge). Positions are the absolute
per-document positions of the `SequenceInfo`, so a packed document continued from an earlier
sample keeps its chunk grid. The Qwen temperature uses, per query, the length of its document as
far as the batch shows it (max position + 1), or `SequenceInfo.seq_len` when given. NoPE layers
of a DCA model are plain causal attention.
"""

from __future__ import annotations

import torch

from megatron_ext.layers.core_attention import _OpsCoreAttention
from megatron_ext.ops import attention_func
from megatron_ext.ops.documents import document_lengths
from megatron_ext.ops.dual_chunk import dca_rotate_keys, dca_temperature, dual_chunk_block


class DualChunkCoreAttention(_OpsCoreAttention):
    """DCA on RoPE layers (chunk_size M, local_size W from the config); causal on NoPE layers."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        q, k, v, info, doc_ids = self._inputs(query, key, value, attention_mask,
                                              packed_seq_params, attention_bias)
        cfg = self.config
        if self.cp_group is not None:
            if not self.layer.rope:
                return self._output(self._cp_attention(q, k, v, info, "plain"))
            out = self._cp_attention(
                q, k, v, info, "dca", chunk_size=cfg.dca_chunk_size,
                local_size=cfg.dca_local_size, theta=cfg.rotary_base,
                original_max_position_embeddings=cfg.dca_original_max_position_embeddings,
                seq_len=info.seq_len)
            return self._output(out)
        if not self.layer.rope:
            out, _ = attention_func(q, k, v, causal=True, softmax_scale=self.softmax_scale,
                                    doc_ids=doc_ids)
            return self._output(out)
        sizes = {"chunk_size": cfg.dca_chunk_size, "local_size": cfg.dca_local_size,
                 "theta": cfg.rotary_base}
        pos = info.positions
        temperature = None
        if cfg.dca_original_max_position_embeddings:
            if info.seq_len is not None:
                length = torch.full_like(pos, info.seq_len)
            else:
                length = document_lengths(pos, doc_ids)
            temperature = dca_temperature(length, cfg.dca_original_max_position_embeddings)
        k_rot = dca_rotate_keys(k, pos, **sizes)
        if doc_ids is None:  # one document per row: its positions must be increasing
            doc_ids = torch.zeros_like(pos)
        out, _ = dual_chunk_block(q, k_rot, v, q_positions=pos, k_positions=pos,
                                  softmax_scale=self.softmax_scale, q_doc_ids=doc_ids,
                                  k_doc_ids=doc_ids, temperature=temperature, **sizes)
        return self._output(out)


__all__ = ["DualChunkCoreAttention"]
