"""Inference: load a checkpoint, full-forward logits, cached chunked prefill and decode.

    from megatron_ext.inference import load_model
    m = load_model("runs/tiny/checkpoint", overrides={"attention.variant": "longheads"})
    m.generate(["Once upon a time"], max_new_tokens=32)

Design and memory per token of each cache: docs/inference.md.
"""

from megatron_ext.inference.generation import GenerationStats, Session
from megatron_ext.inference.loader import (
    from_model,
    load_model,
    resolve_checkpoint,
)
from megatron_ext.inference.model import InferenceModel, peak_memory_bytes
from megatron_ext.inference.sampling import SamplingParams, sample

__all__ = [
    "GenerationStats",
    "InferenceModel",
    "SamplingParams",
    "Session",
    "from_model",
    "load_model",
    "peak_memory_bytes",
    "resolve_checkpoint",
    "sample",
]
