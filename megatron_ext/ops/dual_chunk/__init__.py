"""Dual Chunk Attention (DCA, arXiv 2402.17463): remapped RoPE positions, exact gradients.

``dual_chunk_attn_func`` is the public op, ``dual_chunk_attn_ref`` its dense definition and
``dual_chunk_block`` the (out, lse) block function used by context parallelism. Maths: README.md.
"""

from megatron_ext.ops.dual_chunk.block import (
    dca_key_ranges,
    dca_rotate_keys,
    dca_rotate_queries,
    dual_chunk_block,
)
from megatron_ext.ops.dual_chunk.interface import dual_chunk_attn_func
from megatron_ext.ops.dual_chunk.method import DCAParams, DualChunkAttention
from megatron_ext.ops.dual_chunk.positions import (
    dca_chunk_len,
    dca_inter_position,
    dca_position_rule,
    dca_query_positions,
    dca_temperature,
    doc_runs,
)
from megatron_ext.ops.dual_chunk.reference import dual_chunk_attn_ref
from megatron_ext.ops.intervals import interval_attention

__all__ = [
    "DCAParams",
    "DualChunkAttention",
    "dca_chunk_len",
    "dca_key_ranges",
    "dca_inter_position",
    "dca_position_rule",
    "dca_query_positions",
    "dca_rotate_keys",
    "dca_rotate_queries",
    "dca_temperature",
    "doc_runs",
    "dual_chunk_attn_func",
    "dual_chunk_attn_ref",
    "dual_chunk_block",
    "interval_attention",
]
