"""Cohere-style parallel transformer layer and a scaled final norm, for Megatron-core.

Cohere / Cohere2 layers normalise once and feed the same normalised input to attention and MLP,
summing both into the residual:

    h = x + Attn(LN(x)) + MLP(LN(x))

where LN is a LayerNorm with a weight and no bias. Megatron's `TransformerLayer` runs attention
and MLP one after the other, so `ParallelTransformerLayer` overrides its forward (same
submodules, `pre_mlp_layernorm` unused). Cohere also multiplies the LM logits by a constant
`logit_scale`; `ScaledFinalNorm` applies it after the final norm (the output projection is
linear, so scale * (n W^T) = (scale * n) W^T), which keeps HF norm weights bit-exact.

`parallel_block_spec(layer_spec, model_cfg)` turns the usual layer spec into the block spec
(`TransformerBlockSubmodules`) GPTModel takes.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

__all__ = ["BiasFreeLayerNorm", "ParallelTransformerLayer", "ScaledFinalNorm",
           "parallel_block_spec"]


class BiasFreeLayerNorm(torch.nn.LayerNorm):
    """LayerNorm with a weight and no bias (Cohere's `CohereLayerNorm`), Megatron-buildable."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__(hidden_size, eps=eps, bias=False)


class ScaledFinalNorm(torch.nn.Module):
    """The final norm followed by a constant factor (Cohere `logit_scale`).

    Parameters as the plain norm (`weight` [hidden], plus `bias` for a LayerNorm with bias), so
    state-dict names do not change.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, scale: float = 1.0,
                 bias_free: bool = False, **_: object) -> None:
        super().__init__()
        self.layer_norm = config.normalization == "LayerNorm"
        self.eps, self.scale, self.shape = eps, float(scale), (hidden_size,)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size))
                     if self.layer_norm and not bias_free else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> scale * norm(x), same shape."""
        if self.layer_norm:
            y = F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        else:
            y = F.rms_norm(x, self.shape, self.weight, self.eps)
        return y * self.scale if self.scale != 1.0 else y


class ParallelTransformerLayer(TransformerLayer):
    """TransformerLayer computing x + Attn(LN(x)) + MLP(LN(x)) (one shared input norm)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """hidden_states [S, B, hidden] -> ([S, B, hidden], None); kwargs as TransformerLayer."""
        kwargs.pop("dynamic_inference_decode_only", None)
        names = ("attention_mask", "context", "context_mask", "rotary_pos_emb")
        for name, value in zip(names, args, strict=False):
            kwargs[name] = value
        if kwargs.get("context") is not None:
            raise ValueError("ParallelTransformerLayer: cross-attention context is not supported")
        normed = self.input_layernorm(hidden_states)
        attn_out, attn_bias = self.self_attention(
            normed,
            attention_mask=kwargs.get("attention_mask"),
            inference_context=kwargs.get("inference_context"),
            rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            packed_seq_params=kwargs.get("packed_seq_params"),
            sequence_len_offset=kwargs.get("sequence_len_offset"),
        )
        mlp_out, mlp_bias = self.mlp(normed)
        out = hidden_states + attn_out + mlp_out
        for bias in (attn_bias, mlp_bias):
            if bias is not None:
                out = out + bias
        return out, None


def parallel_block_spec(layer_spec: ModuleSpec, model_cfg) -> TransformerBlockSubmodules:
    """Block spec for a model with `parallel_block` and/or `logit_scale` != 1.

    Args:
        layer_spec: the attention variant's layer spec (`megatron_ext.specs`).
        model_cfg: the `ModelConfig` (num_layers, parallel_block, logit_scale).
    """
    spec = layer_spec
    bias_free = bool(model_cfg.parallel_block)
    if bias_free:
        subs = dataclasses.replace(layer_spec.submodules, input_layernorm=BiasFreeLayerNorm,
                                   pre_mlp_layernorm=IdentityOp)
        spec = ModuleSpec(module=ParallelTransformerLayer, params=dict(layer_spec.params),
                          submodules=subs)
    final = ModuleSpec(module=ScaledFinalNorm,
                       params={"scale": model_cfg.logit_scale, "bias_free": bias_free})
    return TransformerBlockSubmodules(layer_specs=[spec] * model_cfg.num_layers,
                                      layer_norm=final)
