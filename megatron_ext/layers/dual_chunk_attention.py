"""`DualChunkCoreAttention`: Dual Chunk Attention as a Megatron-core core attention.

RoPE layers run `DualChunkAttention` (keys rotated once at `j mod C`, queries at the intra /
successive / inter positions, exact gradients; maths in docs/methods/dual_chunk.md), built from
the config's typed `dca` section; NoPE layers of a DCA model are plain causal attention. The
module base builds the method once and runs it locally or context parallel.
"""

from __future__ import annotations

from megatron_ext.layers.core_attention import _OpsCoreAttention
from megatron_ext.ops import DualChunkAttention
from megatron_ext.ops.method import AttentionMethod


class DualChunkCoreAttention(_OpsCoreAttention):
    """DCA on RoPE layers (sizes from `config.dca`); causal on NoPE layers."""

    def build_method(self) -> AttentionMethod:
        if not self.layer.rope:
            return self._plain_method()
        cfg = self.config
        return DualChunkAttention(cfg.dca, theta=cfg.rotary_base, scaling=self.rope_scaling,
                                  rotary_dim=self._rope().rotary_dim,
                                  softmax_scale=self.softmax_scale)


__all__ = ["DualChunkCoreAttention"]
