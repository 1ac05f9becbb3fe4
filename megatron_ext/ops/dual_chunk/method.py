"""``DualChunkAttention``: DCA as a method object (prologue + block), shared by every caller.

The owner rotates its keys once at ``j mod C`` (``dca_rotate_keys``: what travels under
context parallelism and what a KV cache stores); queries stay un-rotated and the block function
(``dual_chunk_block``) builds the intra / successive / inter copies at the queries' absolute
per-document positions. On one process, CUDA fp16 / bf16 inputs in the plain layout without
documents take the fused Triton kernel (``backend`` decides); everything else the exact
three-pass path on the interval engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_ext.ops.backend import resolve_backend
from megatron_ext.ops.dual_chunk import triton_dca
from megatron_ext.ops.dual_chunk.block import dca_rotate_keys, dual_chunk_block
from megatron_ext.ops.dual_chunk.positions import check_chunk_args, dca_temperature
from megatron_ext.ops.meta import Meta
from megatron_ext.ops.method import AttentionMethod, standard_offset
from megatron_ext.ops.rope import RopeScaling

__all__ = ["DCAParams", "DualChunkAttention"]


@dataclass(frozen=True)
class DCAParams:
    """DCA sizes (ChunkLlama / Qwen naming); chunk length C = chunk_size - local_size."""

    chunk_size: int
    """M: the largest position index DCA uses."""
    local_size: int
    """W: local window kept exact in the successive-chunk pass."""
    original_max_position_embeddings: int | None = None
    """L_o of the Qwen temperature max(1, 0.1 ln(L / L_o) + 1); None disables it."""
    scaling_factor: float = 1.0
    """ChunkLlama position interpolation: chunk-local positions are divided by it (1 = off)."""
    extension_factor: float | None = None
    """ChunkLlama ``scale``: cos and sin x mscale = 1 + 0.05 ln(factor) if factor > 1."""

    def __post_init__(self) -> None:
        check_chunk_args(self.chunk_size, self.local_size)
        l_o = self.original_max_position_embeddings
        if l_o is not None and (isinstance(l_o, bool) or not isinstance(l_o, int) or l_o < 1):
            raise ValueError(f"original_max_position_embeddings={l_o!r}; expected None or >= 1")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor={self.scaling_factor!r}; expected > 0")
        if self.extension_factor is not None and not self.extension_factor > 0:
            raise ValueError(f"extension_factor={self.extension_factor!r}; expected None or > 0")

    @property
    def mscale(self) -> float:
        """ChunkLlama's cos/sin multiplier (q and k both carry it: rotated logits x mscale^2)."""
        f = self.extension_factor
        return 1.0 + 0.05 * math.log(f) if f is not None and f > 1 else 1.0


def _half_tiles(q: torch.Tensor) -> bool:
    """Whether the pass kernels take half inputs as they are (Triton intervals, SDPA pieces on
    CUDA); their partial results are fp32 either way, so nothing is lost by not upcasting."""
    return q.is_cuda and resolve_backend(q, "intervals") in ("triton", "sdpa")


class DualChunkAttention(AttentionMethod):
    """Dual Chunk Attention with exact gradients.

    Args:
        dca: the DCA settings (any object with ``chunk_size``, ``local_size``,
            ``original_max_position_embeddings`` and optionally ``scaling_factor`` and
            ``extension_factor``, e.g. the run config's ``attention.dca``); kept unchanged.
        theta: RoPE base.
        scaling: optional RoPE frequency scaling (dynamic NTK uses the batch length rule);
            exclusive with ``dca.scaling_factor`` != 1 (which is linear scaling of the
            chunk-local positions).
        rotary_dim: rotated dims per head (partial rotary; the rest is position-free).
        softmax_scale: default 1/sqrt(D).
    """

    name = "dca"
    refusal = "a DCA query sees every earlier key of its document (inter pass)"

    def __init__(
        self,
        dca: DCAParams,
        *,
        theta: float = 10000.0,
        scaling: RopeScaling | None = None,
        rotary_dim: int | None = None,
        softmax_scale: float | None = None,
    ) -> None:
        params = DCAParams(  # validates
            dca.chunk_size, dca.local_size, dca.original_max_position_embeddings,
            getattr(dca, "scaling_factor", 1.0), getattr(dca, "extension_factor", None),
        )  # fmt: skip
        if params.scaling_factor != 1.0 or params.mscale != 1.0:
            if scaling is not None:
                raise ValueError(
                    f"dca.scaling_factor={params.scaling_factor} with RoPE scaling "
                    f"{scaling.kind!r}: ChunkLlama's chunk-local position interpolation (and "
                    "its mscale) is itself a linear RoPE scaling; use one of them"
                )
            # ChunkLlama's rotary embedding: positions / scaling_factor, cos and sin x mscale
            scaling = RopeScaling("linear", params.scaling_factor,
                                  attention_factor=params.mscale if params.mscale != 1 else None)
        self.dca = dca  # the caller's typed section, unchanged
        self.theta, self.scaling, self.rotary_dim = theta, scaling, rotary_dim
        self.softmax_scale = softmax_scale

    def _sizes(self) -> dict:
        return {"chunk_size": self.dca.chunk_size, "local_size": self.dca.local_size,
                "theta": self.theta, "rotary_dim": self.rotary_dim}

    def _scale(self, d: int) -> float:
        return d**-0.5 if self.softmax_scale is None else self.softmax_scale

    def prepare_kv(
        self, k: torch.Tensor, v: torch.Tensor, meta: Meta, rope_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos = meta.positions.clamp(min=0)  # host positions: rotations checked on the host
        return dca_rotate_keys(k, pos, scaling=self.scaling, seq_len=rope_len,
                               **self._sizes()), v

    def _temperature(self, qm: Meta) -> torch.Tensor | None:
        l_o = self.dca.original_max_position_embeddings
        return None if not l_o else dca_temperature(qm.lengths.clamp(min=1), l_o)

    def block(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qm: Meta, km: Meta,
        rope_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.dtype in (torch.float16, torch.bfloat16) and not _half_tiles(q):
            q, k, v = q.float(), k.float(), v.float()  # torch tiles: rotate in fp32
        # Padding never meets a real token: its own document ids (-2 queries, -1 keys).
        q_doc = torch.where(qm.positions >= 0, qm.doc_ids, -2)
        k_doc = torch.where(km.positions >= 0, km.doc_ids, -1)
        return dual_chunk_block(  # host metadata: planning reads no device value
            q, k, v, q_positions=qm.positions.clamp(min=0), k_positions=km.positions.clamp(min=0),
            softmax_scale=self._scale(q.shape[-1]), q_doc_ids=q_doc, k_doc_ids=k_doc,
            temperature=self._temperature(qm), scaling=self.scaling, seq_len=rope_len,
            **self._sizes(),
        )  # fmt: skip

    def local_block(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qm: Meta, km: Meta,
        rope_len: int, need_lse: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        off = standard_offset(qm, km)
        one_doc = off is not None and not bool((km.doc_ids != km.doc_ids[:, :1]).any())
        if one_doc and triton_dca.use_triton(q, None):
            temp = self._temperature(qm)
            if temp is None or bool((temp == temp.flatten()[0]).all()):
                t = None if temp is None else temp.flatten()[:1].expand(qm.positions.shape[1])
                return triton_dca.dual_chunk_attn_triton(
                    q, k, v, q_positions=qm.positions[0], k_positions=km.positions[0],
                    temperature=t, softmax_scale=self._scale(q.shape[-1]), q_offset=off,
                    keys_rotated=True,
                    scaling=self.scaling, seq_len=rope_len, **self._sizes(),
                )  # fmt: skip
        out, lse = self.block(q, k, v, qm, km, rope_len)
        return out.to(q.dtype), lse
