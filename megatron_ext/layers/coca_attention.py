"""CoCA (collinear constrained attention) for Megatron-core.

`CoCASelfAttention` is Megatron's `SelfAttention` whose K slice of the fused `linear_qkv` is the
method's `t_proj` (it has exactly k_proj's shape, so fused QKV weights keep their layout and
tensor parallelism splits it like K). `CoCACoreAttention` receives (q, t, v) un-rotated and runs
the CoCA prologue (Q' = q * RoPE(q), K' = RoPE(concat(tau, tau)), or the strict Q'', K'') at the
absolute per-document positions of the `SequenceInfo`, then exact attention on (Q', K', v).
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention

from megatron_ext.layers.core_attention import _OpsCoreAttention
from megatron_ext.ops import attention_func
from megatron_ext.ops.coca import coca_key_prologue, coca_query_prologue


class CoCASelfAttention(SelfAttention):
    """SelfAttention whose key projection is CoCA's `t_proj` (same shape, same fused layout)."""


class CoCACoreAttention(_OpsCoreAttention):
    """CoCA core attention: prologue at absolute positions, then exact attention."""

    def __init__(self, config, layer_number: int, *args, **kwargs) -> None:
        super().__init__(config, layer_number, *args, **kwargs)
        if not self.layer.rope or self.layer.window or self.layer.chunk:
            raise ValueError(f"layer {layer_number}: CoCA needs full RoPE attention, got "
                             f"{self.layer.kind}")

    def forward(self, query, t, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        q, t, v, info, doc_ids = self._inputs(query, t, value, attention_mask,
                                              packed_seq_params, attention_bias)
        cfg = self.config
        rope = {"form": cfg.coca_form, "theta": cfg.rotary_base,
                "scaling": self.rope_scaling, "seq_len": info.seq_len}
        if self.cp_group is not None:
            return self._output(self._cp_attention(
                q, t, v, info, "coca", form=cfg.coca_form, theta=cfg.rotary_base,
                rope_scaling=self.rope_scaling))
        if rope["seq_len"] is None and rope["scaling"] is not None:
            rope["seq_len"] = int(info.positions.max()) + 1  # one dynamic-NTK L for q and k
        q_prime = coca_query_prologue(q, info.positions, **rope)
        k_prime = coca_key_prologue(t, info.positions, **rope)
        out, _ = attention_func(q_prime, k_prime, v, causal=True,
                                softmax_scale=self.softmax_scale, doc_ids=doc_ids)
        return self._output(out)


__all__ = ["CoCACoreAttention", "CoCASelfAttention"]
