"""Layer specs and the GPTModel builder: from the `model` / `attention` config to Megatron-core.

`build_gpt_model(model_cfg, attn_cfg, vocab_size=..., tp=...)` returns a real
`megatron.core.models.gpt.GPTModel` built from the local (non-TransformerEngine) spec with
megatron_ext's core attention in place of `DotProductAttention`. Positions are applied inside the
core attention at the positions the caller passes (GPTModel's own position embedding is 'none').

Implemented variants: 'rope' and 'nope'. The method variants (coca, dca, hybrid, longheads)
arrive with their Megatron modules; asking for one before then is an error, never a silent
fallback to plain attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.config import AttentionConfig, ModelConfig
from megatron_ext.layers.core_attention import ExtCoreAttention

IMPLEMENTED_VARIANTS = ("rope", "nope")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(model_cfg: ModelConfig, *, tp: int = 1, dtype: str = "fp32",
                       ) -> TransformerConfig:
    """Megatron `TransformerConfig` for `model_cfg` (CPU-safe initialisation)."""
    swiglu = model_cfg.activation == "swiglu"
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        normalization=model_cfg.normalization,
        layernorm_epsilon=model_cfg.layernorm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=model_cfg.add_bias_linear,
        init_method_std=model_cfg.init_method_std,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        params_dtype=_DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
    )


def get_rope_layer_spec(model_cfg: ModelConfig, attn_cfg: AttentionConfig) -> ModuleSpec:
    """Local GPT layer spec with ExtCoreAttention (RoPE, or NoPE for variant 'nope')."""
    spec = get_gpt_layer_local_spec(normalization=model_cfg.normalization)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=ExtCoreAttention,
        params={"rope": attn_cfg.variant == "rope", "rope_theta": attn_cfg.rope_theta,
                "mask_documents": attn_cfg.mask_documents},
    )
    return spec


def build_gpt_model(
    model_cfg: ModelConfig,
    attn_cfg: AttentionConfig,
    *,
    vocab_size: int,
    tp: int = 1,
    dtype: str = "fp32",
) -> GPTModel:
    """A GPTModel for the given sections. Megatron's parallel state must be initialised."""
    if attn_cfg.variant not in IMPLEMENTED_VARIANTS:
        raise NotImplementedError(
            f"attention.variant={attn_cfg.variant!r} has no Megatron layer yet; implemented: "
            f"{', '.join(IMPLEMENTED_VARIANTS)}"
        )
    if attn_cfg.rope_scaling is not None or attn_cfg.rotary_percent != 1.0:
        raise NotImplementedError("rope_scaling / rotary_percent are not wired into the "
                                  "Megatron layer yet; leave them at their defaults")
    if attn_cfg.qk_norm != "none":
        raise NotImplementedError(f"attention.qk_norm={attn_cfg.qk_norm!r} is not wired yet")
    vocab = model_cfg.vocab_size or vocab_size
    if vocab % tp:
        raise ValueError(f"vocab size {vocab} is not divisible by tensor_parallel_size={tp}")
    return GPTModel(
        config=transformer_config(model_cfg, tp=tp, dtype=dtype),
        transformer_layer_spec=get_rope_layer_spec(model_cfg, attn_cfg),
        vocab_size=vocab,
        max_sequence_length=model_cfg.max_position_embeddings,
        position_embedding_type="none",
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
    )


__all__ = ["IMPLEMENTED_VARIANTS", "build_gpt_model", "get_rope_layer_spec", "transformer_config"]
