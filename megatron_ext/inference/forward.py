"""A cached forward pass over a megatron_ext GPTModel, layer by layer.

``gpt_forward`` runs a whole sequence through GPTModel at once. Generation instead feeds a few
tokens at a time (a prefill chunk, then one token per step) and keeps every layer's keys in a
cache. This module walks the GPTModel that ``megatron_ext.specs.build_gpt_model`` builds,
using Megatron's own submodules for everything that is per token:

    embedding -> for each layer: input_layernorm, self_attention.get_query_key_value_tensors
    (linear_qkv, plus q_layernorm / k_layernorm when present), [attention], linear_proj,
    residual add, pre_mlp_layernorm, mlp, residual add -> decoder.final_layernorm -> output_layer

and replaces only the attention by the cache step of the layer's method (``attend.py``). With
zero dropout (inference) the layer arithmetic is Megatron's, so the logits equal those of a full
forward of the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_ext.config import LongHeadsConfig
from megatron_ext.inference.attend import LayerMethod, layer_method, meta_of
from megatron_ext.inference.cache import FullCache, RingCache
from megatron_ext.inference.cp_prefill import check_cp_prefill
from megatron_ext.inference.longheads_cache import LongHeadsCache
from megatron_ext.ops import token_meta
from megatron_ext.ops.documents import document_runs

__all__ = ["CachedModel"]

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(layer index, q [B, n, H, D], k, v [B, n, Hkv, D]) -> attention output [B, n, H, D]."""


class CachedModel:
    """The per-layer methods of a GPTModel and the walk that runs it with caches.

    Under context parallelism (a model built with ``cp`` > 1) every rank holds the whole
    model and, after prefill, the whole cache: ``cp_group``, ``cp_layout`` and each layer's
    context-parallel attention (``cp_attend``) serve the sharded prefill (``cp_prefill.py``);
    the cached step itself never communicates.

    Args:
        model: a GPTModel from ``build_gpt_model`` (tensor-parallel size 1).
        variant: the run's ``attention.variant`` (a LongHeads run builds a RoPE model).
        longheads: the LongHeads section (variant "longheads").
        cp_layout: how a prompt is split over the context-parallel ranks ("zigzag" or
            "contiguous"; used only when the model is context parallel).
    """

    def __init__(self, model: torch.nn.Module, variant: str,
                 longheads: LongHeadsConfig | None = None, *, cp_layout: str = "zigzag") -> None:
        cfg = model.config
        if cfg.tensor_model_parallel_size != 1:
            raise ValueError(
                f"inference runs at tensor_parallel_size=1, got "
                f"{cfg.tensor_model_parallel_size}; build the model with tp=1")
        self.cp_size = cfg.context_parallel_size
        if self.cp_size > 1:
            check_cp_prefill(variant, cp_layout, self.cp_size)
        self.model = model
        self.variant = variant
        cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
        self.layers: list[LayerMethod] = [
            layer_method(cfg, layer.layer_number, variant, longheads,
                         method=getattr(core, "method", None))
            for layer, core in zip(model.decoder.layers, cores)
        ]
        self.cp_layout = cp_layout
        self.cp_group = cores[0].cp_group if self.cp_size > 1 else None
        self.cp_attend = [core.attend for core in cores] if self.cp_size > 1 else []
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = cfg.kv_channels

    @property
    def device(self) -> torch.device:
        return self.model.embedding.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embedding.word_embeddings.weight.dtype

    def new_caches(self, batch: int, capacity: int) -> list:
        """One empty cache per layer for ``batch`` rows of up to ``capacity`` positions."""
        shape = (self.kv_heads, self.head_dim, self.dtype, self.device)
        caches = []
        for lm in self.layers:
            if lm.cache == "longheads":
                caches.append(LongHeadsCache(lm, batch, capacity, self.heads, self.kv_heads,
                                             self.head_dim, self.device))
            elif lm.cache == "ring":
                assert lm.size is not None
                caches.append(RingCache(batch, min(lm.size, capacity), *shape))
            else:
                caches.append(FullCache(batch, capacity, *shape))
        return caches

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor,
               attn: AttnFn) -> torch.Tensor:
        """Final-norm hidden states [n, B, hidden] of tokens [B, n] with attention ``attn``."""
        m = self.model
        h = m.embedding(input_ids=tokens, position_ids=positions.clamp(min=0).to(tokens.device))
        for i, layer in enumerate(m.decoder.layers):
            h = _layer(layer, h, lambda q, k, v, i=i: attn(i, q, k, v))
        return m.decoder.final_layernorm(h)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output layer: hidden [n, B, hidden] -> logits [B, n, vocab]."""
        m = self.model
        weight = m.shared_embedding_or_output_weight() if \
            m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(hidden, weight=weight)
        return logits.transpose(0, 1)

    def step(self, caches: list, tokens: torch.Tensor, positions: torch.Tensor,
             lengths: torch.Tensor, rope_len: int) -> torch.Tensor:
        """Feed tokens [B, n] at positions [B, n] (-1 = padding) through the caches.

        Args:
            lengths: int [B], each row's planned total length (DCA temperature).
            rope_len: the batch's dynamic-NTK length.

        Returns:
            final hidden states [n, B, hidden].
        """
        qm = meta_of(positions, lengths)

        def attn(i: int, q, k, v):
            return caches[i].step(self.layers[i], q, k, v, qm, lengths, rope_len)

        return self.hidden(tokens, positions, attn)

    @staticmethod
    def reset_rows(caches: list, rows: torch.Tensor) -> None:
        """Empty the given rows of every layer's cache (a new document starts there)."""
        if len(rows):
            for cache in caches:
                cache.reset_rows(rows)

    def longheads_logits(self, tokens: torch.Tensor,
                         doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Uncached forward with the whole-sequence LongHeads op in every RoPE layer.

        Args:
            tokens: [B, S] (positions 0..S-1 in every row).
            doc_ids: optional int [B, S] of packed rows: positions restart at 0 in every
                document (a run of equal ids) and no token attends across a document.

        Returns:
            logits [B, S, vocab].
        """
        B, S = tokens.shape
        run, pos = (None, torch.arange(S).expand(B, S)) if doc_ids is None else \
            document_runs(doc_ids.detach().to("cpu", torch.int64))
        qm = token_meta(pos, run, seq_len=S)
        doc_ids = None if run is None else run.to(tokens.device)

        def attn(i: int, q, k, v):
            lm = self.layers[i]
            if lm.cache == "longheads":
                return lm.lh_full(q, k, v, doc_ids).to(v.dtype)
            out, _ = lm.attend(lm.prepare_q(q, qm, S), *lm.prepare_kv(k, v, qm, S), qm, qm, S)
            return out.to(v.dtype)

        return self.logits_of(self.hidden(tokens, pos, attn))


def _layer(layer: torch.nn.Module, h: torch.Tensor, attn) -> torch.Tensor:
    """One Megatron TransformerLayer (local spec, pre-norm) with attention replaced by
    ``attn(q, k, v)`` on [B, n, heads, D] tensors; h: [n, B, hidden]."""
    n, B = h.shape[:2]
    x = layer.input_layernorm(h)
    sa = layer.self_attention
    q, k, v = sa.get_query_key_value_tensors(x, None)  # [n, B, heads, D]
    out = attn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    out, bias = sa.linear_proj(out.transpose(0, 1).reshape(n, B, -1))
    if bias is not None:
        out = out + bias
    h = h + out
    x = layer.pre_mlp_layernorm(h)
    out, bias = layer.mlp(x)
    if bias is not None:
        out = out + bias
    return h + out
