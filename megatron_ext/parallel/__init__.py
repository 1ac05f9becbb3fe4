"""Context parallelism. The process group is always an argument; no megatron/deepspeed imports.

- ``make_layout`` / ``CPLayout``: contiguous and zigzag layouts, per document, exact for any
  length (padding is masked and dropped exactly); positions and documents travel with shards.
- ``shard`` / ``unshard``: this rank's part of a global tensor and back.
- ``cp_attn_func``: context-parallel plain / window / chunked / DCA / CoCA attention with the
  ring, allgather, a2a, halo and local plans; equals the single-process op.
- ``bytes_sent`` / ``reset_bytes_sent``: bytes this rank sent, per plan and direction.

Design and communication volumes: docs/context_parallel.md.
"""

from megatron_ext.parallel.comm import bytes_sent, reset_bytes_sent
from megatron_ext.parallel.cp_attention import PLANS, cp_attn_func
from megatron_ext.parallel.methods import ATTNS
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
    "ATTNS",
    "LAYOUTS",
    "PLANS",
    "CPLayout",
    "bytes_sent",
    "cp_attn_func",
    "make_layout",
    "reset_bytes_sent",
    "shard",
    "shard_tensor",
    "unshard",
    "unshard_tensors",
]
