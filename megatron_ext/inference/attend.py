"""Every attention op the inference code calls, in one place.

The cached forward never computes attention itself: it asks this module for a layer's method
(``layer_method``) and calls the method's parts on its caches:

- ``prepare_q`` / ``prepare_kv``: the owner-side prologue at explicit positions (RoPE and its
  scaling, Llama-4 L2 QK-norm or NoPE temperature, DCA's key rotation at ``j mod C``, CoCA's
  Q' and K'); a cache stores prepared keys, so nothing is ever re-rotated;
- ``attend``: prepared queries against a block of cached keys at explicit positions -> fp32
  (out, lse) (``block_attention`` masks for RoPE / NoPE / window / chunk / CoCA,
  ``dual_chunk_block`` for DCA);
- the LongHeads pieces (chunk-local key rotation, summaries, selection, selected attention)
  and the whole-sequence LongHeads op used by the uncached forward.

The method objects are the ones the model's own layers built (``core_attention.method``:
``RopeAttention``, ``DualChunkAttention``, ``CoCAAttention``), so a cached forward and
``gpt_forward`` run the same objects and the same maths. When an op's signature changes, this is
the only inference file that changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_ext.config import LongHeadsConfig
from megatron_ext.layers.transformer_config import ExtTransformerConfig
from megatron_ext.ops import (
    CoCAAttention,
    DualChunkAttention,
    Meta,
    RopeAttention,
    apply_rope,
    block_attention,
    longheads_attn_func,
    longheads_chunk_summaries,
    longheads_select,
    longheads_selected_attn,
)
from megatron_ext.ops.method import AttentionMethod

__all__ = ["LayerMethod", "layer_method", "meta_of"]

METHODS = ("rope", "nope", "hybrid", "coca", "dca", "longheads")


@dataclass
class LayerMethod:
    """One layer's attention at inference: the ops method plus what the cache needs to know.

    ``cache`` names the cache layout: "full" (every prepared key), "ring" (the last ``size``
    positions: sliding window W, or chunked-local c where only the current chunk is visible) or
    "longheads" (chunk-local keys, values and per-chunk summaries).
    """

    layer_number: int
    kind: str
    """rope_full | rope_swa | rope_chunked | nope_full | dca | coca | longheads."""
    method: AttentionMethod | None
    cache: str
    size: int | None = None
    theta: float = 10000.0
    softmax_scale: float | None = None
    longheads: LongHeadsConfig | None = None

    # -- methods with a prologue + block pair ------------------------------------------------

    def prepare_q(self, q: torch.Tensor, meta: Meta, rope_len: int) -> torch.Tensor:
        """Queries [B, n, H, D] -> what ``attend`` takes (DCA keeps them un-rotated)."""
        assert self.method is not None
        return self.method.prepare_q(q, meta, rope_len)

    def prepare_kv(
        self, k: torch.Tensor, v: torch.Tensor, meta: Meta, rope_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, n, Hkv, D] -> the form a cache stores."""
        assert self.method is not None
        return self.method.prepare_kv(k, v, meta, rope_len)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qm: Meta, km: Meta,
        rope_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared queries against prepared cached keys at explicit positions -> fp32 (out,
        lse). Keys may be in any order; negative key positions are empty slots."""
        assert self.method is not None
        return self.method.block(q, k, v, qm, km, rope_len)

    # -- LongHeads ------------------------------------------------------------------------

    @property
    def scale(self) -> float | None:
        return self.softmax_scale

    def lh_local_keys(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """R_{j mod w} k_j in fp32: the key form LongHeads attends and summarises with."""
        assert self.longheads is not None
        w = self.longheads.chunk_len
        return apply_rope(k.float(), positions.clamp(min=0).to(k.device) % w, theta=self.theta)

    def lh_plain(
        self, q: torch.Tensor, k_true: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor,
        kpos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain causal RoPE attention of rows before ``begin_selective_length``.

        q: un-rotated [B, n, H, D]; k_true: keys rotated at their true positions.
        """
        qr = apply_rope(q.float(), qpos.clamp(min=0).to(q.device), theta=self.theta)
        return block_attention(qr, k_true, v.float(), q_positions=qpos, k_positions=kpos,
                               softmax_scale=self.softmax_scale)

    def lh_true_keys(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys rotated at their true positions (fp32), for the plain rows."""
        return apply_rope(k.float(), positions.clamp(min=0).to(k.device), theta=self.theta)

    def lh_summaries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Summaries r_c [B, c, H, D] of whole chunks given raw q [B, c*w, H, D], k, v."""
        assert self.longheads is not None
        return longheads_chunk_summaries(q.float(), k.float(), v.float(),
                                         chunk_len=self.longheads.chunk_len, theta=self.theta,
                                         softmax_scale=self.softmax_scale)

    def lh_selective(
        self, q: torch.Tensor, summaries: torch.Tensor, k_local: torch.Tensor, v: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk choice and re-laid attention for rows at ``positions`` [B, n] (all selective).

        summaries: [B, NC, H, D] with NC >= a - 1 for every row; k_local, v: [B, Sk, Hkv, D]
        with every chunk before each row's own one complete.
        """
        lh = self.longheads
        assert lh is not None
        pos = positions.to(q.device)
        chunks = longheads_select(q.float(), summaries, pos, chunk_len=lh.chunk_len,
                                  num_chunks=lh.num_chunks, num_kv_heads=k_local.shape[2])
        return longheads_selected_attn(q.float(), k_local, v, chunks, pos,
                                       chunk_len=lh.chunk_len, theta=self.theta,
                                       softmax_scale=self.softmax_scale)

    def lh_full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The whole-sequence LongHeads op (rows at positions 0..S-1, or per document of
        ``doc_ids`` [B, S]) -> out [B, S, H, D]."""
        lh = self.longheads
        assert lh is not None
        return longheads_attn_func(q, k, v, chunk_len=lh.chunk_len, num_chunks=lh.num_chunks,
                                   theta=self.theta, softmax_scale=self.softmax_scale,
                                   doc_ids=doc_ids)

    @property
    def begin_selective(self) -> int:
        """First position that selects chunks (K * w)."""
        assert self.longheads is not None
        return self.longheads.chunk_len * self.longheads.num_chunks


def layer_method(
    config: ExtTransformerConfig, layer_number: int, variant: str,
    longheads: LongHeadsConfig | None = None, method: AttentionMethod | None = None,
) -> LayerMethod:
    """The inference attention of one layer (1-based ``layer_number``).

    Args:
        config: the model's ExtTransformerConfig (a LongHeads run builds a RoPE model).
        layer_number: Megatron's 1-based layer number.
        variant: the run's ``attention.variant`` (one of ``METHODS``).
        longheads: the LongHeads section (variant "longheads").
        method: the method object the layer built (``core_attention.method``): the cache runs
            exactly what training runs. Needed for every variant but LongHeads.

    Raises:
        ValueError: an unknown variant, or a setting the method cannot run with.
    """
    if variant not in METHODS:
        raise ValueError(f"attention.variant={variant!r}; expected one of {', '.join(METHODS)}")
    layer = config.layer_attention(layer_number)
    scale = config.softmax_scale
    base = {"layer_number": layer_number, "theta": config.rotary_base, "softmax_scale": scale}
    if variant == "longheads" and layer.rope:
        if config.rope_scaling is not None or config.rotary_percent != 1.0:
            raise ValueError("attention.variant='longheads' re-lays positions with plain RoPE "
                             f"on the whole head; rope_scaling={config.rope_scaling} and "
                             f"rotary_percent={config.rotary_percent} are not supported")
        if layer.window is not None or layer.chunk is not None or layer.qk_l2_norm:
            raise ValueError(f"layer {layer_number}: LongHeads needs full RoPE layers, got "
                             f"{layer.kind}")
        return LayerMethod(kind="longheads", method=None, cache="longheads",
                           longheads=longheads or LongHeadsConfig(), **base)
    if method is None:
        raise ValueError(f"layer {layer_number}: pass the layer's method object "
                         "(core_attention.method)")
    if isinstance(method, DualChunkAttention):
        return LayerMethod(kind="dca", method=method, cache="full", **base)
    if isinstance(method, CoCAAttention):
        return LayerMethod(kind="coca", method=method, cache="full", **base)
    if not isinstance(method, RopeAttention):
        raise ValueError(f"layer {layer_number}: no KV cache for {type(method).__name__}")
    size = method.window if method.window is not None else method.chunk
    return LayerMethod(kind=layer.kind, method=method, cache="full" if size is None else "ring",
                       size=size, **base)


def meta_of(positions: torch.Tensor, lengths: torch.Tensor | int) -> Meta:
    """Meta of a block of one-document rows: positions [B, n] (negative = empty slot).

    ``lengths`` (an int or int [B]) is each row's sequence length for length rules (the DCA
    temperature): the planned total length of its generation, as
    ``gpt_forward(..., seq_len=length)`` uses for that row.
    """
    pos = positions.detach().to("cpu", torch.int64)
    rows = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1, 1).expand(pos.shape[0], 1)
    return Meta(pos, torch.zeros_like(pos), torch.where(pos >= 0, rows, 0))


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    """The softmax scale a layer uses."""
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
