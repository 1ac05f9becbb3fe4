"""CoCA (collinear constrained attention) for Megatron-core.

`CoCASelfAttention` is Megatron's `SelfAttention` whose K slice of the fused `linear_qkv` is the
method's `t_proj` (it has exactly k_proj's shape, so fused QKV weights keep their layout and
tensor parallelism splits it like K). `CoCACoreAttention` receives (q, t, v) un-rotated and runs
`CoCAAttention` (the prologue Q' = q * RoPE(q), K' = RoPE(concat(tau, tau)), or the strict Q'',
K'', at absolute per-document positions; then exact attention on (Q', K', v)); maths in
docs/methods/coca.md.
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention

from megatron_ext.layers.core_attention import _OpsCoreAttention
from megatron_ext.ops import CoCAAttention
from megatron_ext.ops.method import AttentionMethod


class CoCASelfAttention(SelfAttention):
    """SelfAttention whose key projection is CoCA's `t_proj` (same shape, same fused layout)."""


class CoCACoreAttention(_OpsCoreAttention):
    """CoCA core attention: prologue at absolute positions, then exact attention."""

    def build_method(self) -> AttentionMethod:
        if not self.layer.rope or self.layer.window or self.layer.chunk:
            raise ValueError(f"layer {self.layer_number}: CoCA needs full RoPE attention, got "
                             f"{self.layer.kind}")
        cfg = self.config
        return CoCAAttention(form=cfg.coca_form, theta=cfg.rotary_base, scaling=self.rope_scaling,
                             rotary_dim=self._rope().rotary_dim, causal=True,
                             softmax_scale=self.softmax_scale)


__all__ = ["CoCACoreAttention", "CoCASelfAttention"]
