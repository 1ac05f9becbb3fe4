"""Hugging Face config of models exported from megatron_ext (bundled with the weights).

`megatron_ext_model` and `megatron_ext_attention` hold megatron_ext's `model` and `attention`
run-config sections verbatim; `megatron_ext_layer_types` the resolved per-layer kinds
(rope_full, rope_swa, rope_chunked, nope_full). The usual HF size fields are mirrored for
tools that read them.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MegatronExtConfig(PretrainedConfig):
    model_type = "megatron_ext"

    def __init__(self, megatron_ext_model=None, megatron_ext_attention=None,
                 megatron_ext_layer_types=None, vocab_size=None, tie_word_embeddings=True,
                 **kwargs) -> None:
        self.megatron_ext_model = dict(megatron_ext_model or {})
        self.megatron_ext_attention = dict(megatron_ext_attention or {})
        self.megatron_ext_layer_types = list(megatron_ext_layer_types or [])
        self.vocab_size = vocab_size
        m = self.megatron_ext_model
        if m:
            self.hidden_size = m["hidden_size"]
            self.num_hidden_layers = m["num_layers"]
            self.num_attention_heads = m["num_attention_heads"]
            self.num_key_value_heads = m.get("num_query_groups") or m["num_attention_heads"]
            self.max_position_embeddings = m.get("max_position_embeddings")
        kwargs.pop("hidden_size", None)
        kwargs.pop("num_hidden_layers", None)
        kwargs.pop("num_attention_heads", None)
        kwargs.pop("num_key_value_heads", None)
        kwargs.pop("max_position_embeddings", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
