"""Triton flash-attention kernels: plain / windowed / chunked / document masks and fused DCA.

``triton_attention`` and ``triton_dca_attention`` return (out, lse) and are differentiable
through both. Design, verification status and GPU commands: README.md in this folder.
"""

from megatron_ext.ops.triton.interface import (
    HEAD_DIMS,
    triton_attention,
    triton_attention_supported,
    triton_dca_attention,
)
from megatron_ext.ops.triton.tiles import triton_available

__all__ = [
    "HEAD_DIMS",
    "triton_attention",
    "triton_attention_supported",
    "triton_available",
    "triton_dca_attention",
]
