"""Pure tensor attention ops (torch, triton). Never imports megatron or deepspeed."""

from megatron_ext.ops.attention import attention_func
from megatron_ext.ops.attention_ref import attention_ref
from megatron_ext.ops.backend import force_backend
from megatron_ext.ops.block_attention import block_attention, block_key_ranges
from megatron_ext.ops.coca import (
    CoCAAttention,
    coca_attn_func,
    coca_attn_ref,
    coca_key_prologue,
    coca_query_prologue,
    coca_tau,
)
from megatron_ext.ops.dual_chunk import (
    DCAParams,
    DualChunkAttention,
    dual_chunk_attn_func,
    dual_chunk_attn_ref,
    dual_chunk_block,
)
from megatron_ext.ops.longheads import (
    longheads_attn_func,
    longheads_attn_ref,
    longheads_chunk_summaries,
    longheads_select,
    longheads_selected_attn,
)
from megatron_ext.ops.merge import merge_attn_outputs
from megatron_ext.ops.meta import Meta, rope_length, token_meta
from megatron_ext.ops.method import AttentionMethod, BatchMeta
from megatron_ext.ops.rope import RopeScaling, apply_rope, rope_cos_sin
from megatron_ext.ops.rope_attention import Rope, RopeAttention, rope_attn_func

# Public names; add yours when you add an import above.
__all__ = [
    "AttentionMethod",
    "BatchMeta",
    "CoCAAttention",
    "DCAParams",
    "DualChunkAttention",
    "Meta",
    "Rope",
    "RopeAttention",
    "apply_rope",
    "attention_func",
    "attention_ref",
    "block_attention",
    "block_key_ranges",
    "coca_attn_func",
    "coca_attn_ref",
    "coca_key_prologue",
    "coca_query_prologue",
    "coca_tau",
    "dual_chunk_attn_func",
    "dual_chunk_attn_ref",
    "dual_chunk_block",
    "force_backend",
    "longheads_attn_func",
    "longheads_attn_ref",
    "longheads_chunk_summaries",
    "longheads_select",
    "longheads_selected_attn",
    "merge_attn_outputs",
    "rope_cos_sin",
    "RopeScaling",
    "rope_attn_func",
    "rope_length",
    "token_meta",
]
