"""Shared helpers of the conversion tests: tiny HF models built with transformers, our model
built from a converted config, logits on both sides."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_ext.convert import hf_to_run_config, load_hf_into
from megatron_ext.layers.forward import gpt_forward
from megatron_ext.specs import build_gpt_model

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.2)


def make_hf(tmp: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Save a random tiny HF model of `model_type` (fp32 safetensors) under tmp/model_type."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = AutoConfig.for_model(model_type, **{**TINY, **ids, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    out = tmp / f"hf_{model_type}"
    model.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
    return out


def hf_logits(hf_dir: Path, tokens: torch.Tensor, **kw) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                 dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def our_model(hf_dir: Path, cfg=None):
    cfg = cfg or hf_to_run_config(hf_dir)
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=cfg.model.vocab_size,
                            perform_initialization=False)
    load_hf_into(model, hf_dir)
    return model.eval(), cfg


def our_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gpt_forward(model, tokens).float()


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (small test models only)."""
    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def hf_config(hf_dir: Path) -> dict:
    data = AutoConfig.from_pretrained(hf_dir, trust_remote_code=True).to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "dtype",
                "torch_dtype"):
        data.pop(key, None)
    return data


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
