"""Test helper: the attention method object for a short name and the single-process op's
keyword arguments (the CP tests and benchmarks describe their cases this way)."""

from __future__ import annotations

from megatron_ext.ops import CoCAAttention, DCAParams, DualChunkAttention, RopeAttention


def make_method(attn: str, **kw):
    """plain (causal), window (window), chunked (chunk), dca (chunk_size, local_size,
    original_max_position_embeddings, theta, rope_scaling), coca (form, causal, theta,
    rope_scaling). RoPE is applied by the caller for plain / window / chunked (rope=None)."""
    scale = kw.pop("softmax_scale", None)
    if attn in ("plain", "window", "chunked"):
        mask = {"window": kw.pop("window", None), "chunk": kw.pop("chunk", None)}
        return RopeAttention(rope=None, causal=kw.pop("causal", True), softmax_scale=scale,
                             **mask, **kw)
    if attn == "dca":
        params = DCAParams(kw.pop("chunk_size"), kw.pop("local_size"),
                           kw.pop("original_max_position_embeddings", None))
        return DualChunkAttention(params, theta=kw.pop("theta", 10000.0),
                                  scaling=kw.pop("rope_scaling", None), softmax_scale=scale, **kw)
    if attn == "coca":
        return CoCAAttention(form=kw.pop("form", "slack"), causal=kw.pop("causal", True),
                             theta=kw.pop("theta", 10000.0), scaling=kw.pop("rope_scaling", None),
                             softmax_scale=scale, **kw)
    raise ValueError(f"attn={attn!r}")
