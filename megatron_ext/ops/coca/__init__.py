"""CoCA (collinear constrained attention): reference, prologues and fast path.

See README.md in this folder.
"""

from megatron_ext.ops.coca.interface import coca_attn_func
from megatron_ext.ops.coca.method import CoCAAttention
from megatron_ext.ops.coca.prologue import (
    COCA_FORMS,
    coca_key_prologue,
    coca_positions,
    coca_query_prologue,
    coca_rope_seq_len,
    coca_tau,
)
from megatron_ext.ops.coca.reference import coca_attn_ref

__all__ = [
    "CoCAAttention",
    "COCA_FORMS",
    "coca_attn_func",
    "coca_attn_ref",
    "coca_key_prologue",
    "coca_positions",
    "coca_query_prologue",
    "coca_rope_seq_len",
    "coca_tau",
]
