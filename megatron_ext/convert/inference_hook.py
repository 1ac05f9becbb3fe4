"""`load_model` on an HF directory: convert on the fly (in memory) and wrap for inference."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

__all__ = ["hf_inference_loader"]

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_inference_loader(path: str | os.PathLike, overrides: Iterable[str] = (), *,
                        device: str | torch.device = "cpu", dtype: str = "fp32",
                        context_parallel: int = 1):
    """An `InferenceModel` of the HF model in `path` (`--set`-style `overrides` applied),
    context parallel over `context_parallel` ranks (see `load_model`)."""
    from megatron_ext.config import config_from_dict
    from megatron_ext.convert.api import hf_to_run_config, load_hf_into
    from megatron_ext.data.tokenizer import load_tokenizer
    from megatron_ext.inference.loader import (
        build_inference_model,
        ensure_megatron,
        from_model,
        inference_config,
    )
    from megatron_ext.typed_yaml import to_dict

    cfg = config_from_dict(to_dict(hf_to_run_config(path)), list(overrides))
    cfg = inference_config(cfg, context_parallel)
    ensure_megatron(context_parallel)
    model = build_inference_model(cfg, cfg.model.vocab_size)
    load_hf_into(model, path)
    model = model.to(device=torch.device(device), dtype=_DT[dtype]).eval()
    return from_model(model, cfg, load_tokenizer(cfg.data.tokenizer))
