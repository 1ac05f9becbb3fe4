"""Context parallelism. The process group is always an argument; no megatron/deepspeed imports.

- ``make_layout`` / ``CPLayout``: contiguous and zigzag layouts, per document, exact for any
  length (padding is masked and dropped exactly); positions and documents travel with shards.
- ``shard`` / ``unshard``: this rank's part of a global tensor and back.
- ``ContextParallel(method, group, plan)``: any attention method object (``megatron_ext.ops``:
  RopeAttention, CoCAAttention, DualChunkAttention) run over a CP group with the ring,
  allgather, a2a, halo or local plan; equals the method on one process. ``cp_batch`` makes the
  per-batch metadata once; ``cp_attn_func`` is the functional form.
- ``bytes_sent`` / ``reset_bytes_sent``: bytes this rank sent, per plan and direction.

Design and communication volumes: docs/context_parallel.md.
"""

from megatron_ext.parallel.comm import bytes_sent, reset_bytes_sent
from megatron_ext.parallel.cp_attention import (
    PLANS,
    ContextParallel,
    cp_attn_func,
    cp_batch,
    layout_meta,
)
from megatron_ext.parallel.sharding import (
    LAYOUTS,
    CPLayout,
    make_layout,
    shard,
    shard_tensor,
    unshard,
    unshard_tensors,
)

__all__ = [
    "LAYOUTS",
    "PLANS",
    "CPLayout",
    "ContextParallel",
    "bytes_sent",
    "cp_attn_func",
    "cp_batch",
    "layout_meta",
    "make_layout",
    "reset_bytes_sent",
    "shard",
    "shard_tensor",
    "unshard",
    "unshard_tensors",
]
