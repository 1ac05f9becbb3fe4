"""LongHeads: training-free chunk retrieval per attention head (arXiv 2402.10685), inference only.

Maths and design notes: README.md in this folder.
"""

from megatron_ext.ops.longheads.interface import longheads_attn_func, longheads_selected_attn
from megatron_ext.ops.longheads.reference import longheads_attn_ref, longheads_summaries_ref
from megatron_ext.ops.longheads.selection import longheads_chunk_summaries, longheads_select

__all__ = [
    "longheads_attn_func",
    "longheads_attn_ref",
    "longheads_chunk_summaries",
    "longheads_select",
    "longheads_selected_attn",
    "longheads_summaries_ref",
]
