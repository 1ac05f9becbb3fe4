"""Tiny models for the inference tests: a run config plus a GPTModel with peaked weights.

Weights are redrawn larger than the training initialisation so attention is peaked and the
logits depend visibly on positions, masks and the method (a wrong position rule or a missed
key moves them far more than the tolerances).
"""

from __future__ import annotations

import torch

from megatron_ext.config import RunConfig, load_config
from megatron_ext.inference import InferenceModel, from_model
from megatron_ext.inference.loader import (
    build_attention,
    build_inference_model,
    inference_config,
)
from megatron_ext.specs import build_gpt_model

VOCAB = 97
TINY = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.max_position_embeddings=64"]

# id -> overrides; every method and hybrid layer kind of the package.
METHODS = {
    "rope": ["attention.variant=rope"],
    "rope-ntk": ["attention.variant=rope", "attention.rope_scaling={type: dynamic, factor: 2.0, "
                 "original_max_position_embeddings: 16}"],
    "rope-yarn": ["attention.variant=rope", "attention.rope_scaling={type: yarn, factor: 4.0, "
                  "original_max_position_embeddings: 16}"],
    "nope": ["attention.variant=nope"],
    "hybrid-swa": ["attention.variant=hybrid", "attention.hybrid={preset: cohere2, window: 5}"],
    "hybrid-chunk-temp": ["attention.variant=hybrid", "attention.qk_norm=l2_post_rope",
                          "attention.hybrid={preset: llama4, chunk: 6, floor_scale: 8, "
                          "attn_scale: 0.5}"],
    "dca": ["attention.variant=dca",
            "attention.dca={chunk_size: 10, local_size: 3, original_max_position_embeddings: 8}"],
    "coca": ["attention.variant=coca"],
    "coca-neox-partial": ["attention.variant=coca", "attention.rotary_percent=0.5"],
    "dca-chunkllama-partial": ["attention.variant=dca", "attention.rotary_percent=0.5",
                               "attention.dca={chunk_size: 10, local_size: 3, "
                               "scaling_factor: 2.0, extension_factor: 4.0}"],
    "longheads": ["attention.variant=longheads",
                  "attention.longheads={chunk_len: 4, num_chunks: 3}"],
}


def tiny_config(overrides: list[str]) -> RunConfig:
    return load_config(None, [*TINY, *overrides])


def peak_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Redraw every weight (norm weights near 1) from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(noise * (0.5 if "embedding" in name else 0.2 if "qkv" in name else 0.1))


def tiny_model(overrides: list[str], seed: int = 0, cp: int = 1) -> InferenceModel:
    """An InferenceModel of TINY + overrides with peaked weights (fp32, CPU).

    With ``cp`` > 1 the model is built context parallel over Megatron's CP group (initialised
    by the caller) the way ``load_model(..., context_parallel=cp)`` builds it.
    """
    cfg = tiny_config(overrides)
    if cp > 1:
        cfg = inference_config(cfg, cp)
        model = build_inference_model(cfg, VOCAB)
    else:
        model = build_gpt_model(cfg.model, build_attention(cfg), vocab_size=VOCAB)
    peak_weights(model, seed)
    return from_model(model, cfg)


TOKENIZER_VOCAB = 4096  # the shipped tokenizer's, so the CLI can encode text


def save_tiny_rope(path) -> tuple[torch.nn.Module, RunConfig]:
    """Save a tiny RoPE model with peaked weights and the shipped tokenizer's vocabulary at
    ``path`` (run config beside it); returns (model, config)."""
    from megatron_ext.checkpoint import save_megatron_checkpoint

    cfg = tiny_config(["attention.variant=rope", "inference.max_seq_len=64"])
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=TOKENIZER_VOCAB)
    peak_weights(model)
    save_megatron_checkpoint(model, path, config=cfg)
    return model, cfg
