"""Layer specs and the GPTModel builder: from the `model` / `attention` config to Megatron-core.

`build_gpt_model(model_cfg, attn_cfg, vocab_size=..., tp=...)` returns a real
`megatron.core.models.gpt.GPTModel` built from the local (non-TransformerEngine) layer spec with
megatron_ext's core attention in place of `DotProductAttention`. GPTModel's own position
embedding is 'none': RoPE (and DCA's / CoCA's position rules) are applied inside the core
attention at the positions the caller passes in a `SequenceInfo` (GPTModel's
`packed_seq_params`; `megatron_ext.layers.forward.gpt_forward` builds it).

One spec serves every layer of a model: each core-attention module resolves its own layer's
behaviour (RoPE or NoPE, window, chunk, temperature) from `ExtTransformerConfig` by layer
number, the way upstream `no_rope_freq` / `window_attn_skip_freq` work.

`python -m megatron_ext.specs --config configs/model/X.yaml --dry-run` builds the model on the
meta device (no memory) and prints its parameter count.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.config import AttentionConfig, ModelConfig
from megatron_ext.layers.coca_attention import CoCACoreAttention, CoCASelfAttention
from megatron_ext.layers.core_attention import ExtCoreAttention
from megatron_ext.layers.dual_chunk_attention import DualChunkCoreAttention
from megatron_ext.layers.transformer_config import ExtTransformerConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _variant_fields(model_cfg: ModelConfig, attn: AttentionConfig) -> dict:
    """ExtTransformerConfig fields for the attention section."""
    n = model_cfg.num_layers
    out: dict = {
        "attention_variant": attn.variant,
        "rotary_base": attn.rope_theta,
        "rotary_percent": attn.rotary_percent,
        "coca_form": attn.coca_form,
        "mask_documents": attn.mask_documents,
        "qk_layernorm": attn.qk_norm == "layernorm_pre_rope",
        "qk_l2_norm": attn.qk_norm == "l2_post_rope",
    }
    if attn.rope_scaling is not None:
        rs = attn.rope_scaling
        out["rope_scaling"] = {
            "type": rs.type, "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings
            or model_cfg.max_position_embeddings,
            "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow,
            "attention_factor": rs.attention_factor,
            **({"low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor}
               if rs.type == "llama3" else {}),
        }
    if attn.variant == "dca":
        assert attn.dca is not None
        out["dca"] = attn.dca  # the typed section, unchanged, down to the op
    if attn.variant == "hybrid":
        assert attn.hybrid is not None
        hy = attn.hybrid
        types = hy.resolve(n)
        out["no_rope_freq"] = [1 if t.startswith("nope") else 0 for t in types]
        if "rope_swa" in types:
            out["window_size"] = (hy.window - 1, 0)
            out["window_attn_skip_freq"] = [1 if t == "rope_swa" else 0 for t in types]
        if "rope_chunked" in types:
            out["attention_chunk_size"] = hy.chunk
            out["chunked_attn_skip_freq"] = [1 if t == "rope_chunked" else 0 for t in types]
        out.update(attn_temperature_tuning=hy.use_temperature,
                   attn_temperature_floor_scale=hy.floor_scale,
                   attn_temperature_scale=hy.attn_scale)
    return out


_COMM_TYPE = {"ring": "p2p", "allgather": "all_gather", "a2a": "a2a"}


def ext_transformer_config(
    model_cfg: ModelConfig, attn_cfg: AttentionConfig, *, tp: int = 1, dtype: str = "fp32",
    perform_initialization: bool = True, cp: int = 1, cp_algorithm: str = "ring",
    use_cpu_initialization: bool = True,
) -> ExtTransformerConfig:
    """The Megatron config (an `ExtTransformerConfig`) for the model and attention sections.

    `use_cpu_initialization=False` (CUDA only) initialises weights on the GPU with Megatron's
    CUDA RNG tracker, which `model_parallel_cuda_manual_seed` must have seeded.
    """
    if attn_cfg.variant == "longheads":
        raise NotImplementedError(
            "attention.variant='longheads' is inference-only and has no Megatron training layer; "
            "train with 'rope' and use LongHeads at inference")
    swiglu = model_cfg.activation == "swiglu"
    return ExtTransformerConfig(
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
        add_qkv_bias=model_cfg.add_qkv_bias,
        init_method_std=model_cfg.init_method_std,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        cp_comm_type=_COMM_TYPE[cp_algorithm],
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        params_dtype=_DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        **_variant_fields(model_cfg, attn_cfg),
    )


def _local_spec(config: ExtTransformerConfig, core_attention: type) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization=config.normalization,
                                    qk_layernorm=config.qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def get_rope_layer_spec(config: ExtTransformerConfig) -> ModuleSpec:
    """RoPE / NoPE / hybrid (window, chunked, temperature) layers: ExtCoreAttention."""
    return _local_spec(config, ExtCoreAttention)


def get_dca_layer_spec(config: ExtTransformerConfig) -> ModuleSpec:
    """Dual Chunk Attention layers: DualChunkCoreAttention."""
    return _local_spec(config, DualChunkCoreAttention)


def get_coca_layer_spec(config: ExtTransformerConfig) -> ModuleSpec:
    """CoCA layers: CoCASelfAttention (K slice = t_proj) with CoCACoreAttention."""
    spec = _local_spec(config, CoCACoreAttention)
    spec.submodules.self_attention.module = CoCASelfAttention
    return spec


ATTENTION_VARIANTS: dict[str, Callable[[ExtTransformerConfig], ModuleSpec]] = {
    "rope": get_rope_layer_spec,
    "nope": get_rope_layer_spec,
    "hybrid": get_rope_layer_spec,
    "dca": get_dca_layer_spec,
    "coca": get_coca_layer_spec,
}


def _block_spec(layer_spec: ModuleSpec, model_cfg: ModelConfig):
    """The layer spec, or the Cohere-style block spec (parallel block / logit scale)."""
    if not model_cfg.parallel_block and model_cfg.logit_scale == 1.0:
        return layer_spec
    from megatron_ext.layers.parallel_block import parallel_block_spec

    return parallel_block_spec(layer_spec, model_cfg)


def build_gpt_model(
    model_cfg: ModelConfig,
    attn_cfg: AttentionConfig,
    *,
    vocab_size: int,
    tp: int = 1,
    dtype: str = "fp32",
    perform_initialization: bool = True,
    cp: int = 1,
    cp_algorithm: str = "ring",
    use_cpu_initialization: bool = True,
) -> GPTModel:
    """A GPTModel for the given sections. Megatron's parallel state must be initialised.

    With `cp` > 1 the core attention runs context parallel over Megatron's CP group
    (`cp_algorithm` for global layers; sliding-window and chunked layers use the halo plan);
    batches must then be sharded with `megatron_ext.parallel.batch.cp_shard_batch`.
    """
    config = ext_transformer_config(model_cfg, attn_cfg, tp=tp, dtype=dtype,
                                    perform_initialization=perform_initialization, cp=cp,
                                    cp_algorithm=cp_algorithm,
                                    use_cpu_initialization=use_cpu_initialization)
    vocab = model_cfg.vocab_size or vocab_size
    if vocab % tp:
        raise ValueError(f"vocab size {vocab} is not divisible by tensor_parallel_size={tp}")
    return GPTModel(
        config=config,
        transformer_layer_spec=_block_spec(ATTENTION_VARIANTS[attn_cfg.variant](config),
                                           model_cfg),
        vocab_size=vocab,
        max_sequence_length=model_cfg.max_position_embeddings,
        position_embedding_type="none",
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
    )


def dry_run(model_cfg: ModelConfig, attn_cfg: AttentionConfig, *, vocab_size: int) -> int:
    """Build the model on the meta device (no memory, no init) and return its parameter count.

    Initialises a single-process Megatron parallel state if none exists.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ext.dist import init_distributed

    if not dist.is_initialized():
        init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
    with torch.device("meta"):
        model = build_gpt_model(model_cfg, attn_cfg, vocab_size=vocab_size,
                                perform_initialization=False)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    from megatron_ext.config import add_config_args, config_from_args

    parser = argparse.ArgumentParser(description="Build a GPTModel from a config.")
    add_config_args(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="build on the meta device and print the parameter count")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="vocabulary when model.vocab_size is unset")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if not args.dry_run:
        parser.error("only --dry-run is available from the command line; train with "
                     "python -m megatron_ext.train")
    n = dry_run(cfg.model, cfg.attention, vocab_size=args.vocab_size)
    m = cfg.model
    print(f"{args.config}: variant={cfg.attention.variant} layers={m.num_layers} "
          f"hidden={m.hidden_size} heads={m.num_attention_heads}/"
          f"{m.num_query_groups or m.num_attention_heads} params={n:,} ({n / 1e9:.2f} B)")


if __name__ == "__main__":
    main()


__all__ = [
    "ATTENTION_VARIANTS", "build_gpt_model", "dry_run", "ext_transformer_config",
    "get_coca_layer_spec", "get_dca_layer_spec", "get_rope_layer_spec",
]
