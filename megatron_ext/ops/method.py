"""An attention method as two parts: a per-token prologue and a block function.

Every method of the package fits one shape, which is what lets one code path serve the model,
context parallelism, the KV cache and the benchmarks:

- ``prepare_q`` / ``prepare_kv``: what a token's owner computes from its own vectors and its own
  position before any communication (RoPE, the Llama-4 temperature, L2 QK-norm, DCA's key
  rotation at ``j mod C``, CoCA's Q' and K');
- ``block``: attention of prepared queries against one block of prepared keys, at explicit
  per-token metadata (``Meta``), returning a mergeable fp32 (out, lse). Blocks of keys merged
  with ``merge_attn_outputs`` give the whole result, values and gradients.

Calling the method runs both on one process (``__call__``): the public ops
(``rope_attn_func``, ``coca_attn_func``, ``dual_chunk_attn_func``) are thin wrappers over it.
Context parallelism (``megatron_ext.parallel.ContextParallel``) runs the same prologue on each
rank and feeds the same block function to its communication plans. Methods also tell the CP
layer which plans can honour their mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_ext.ops.attention import attention_func
from megatron_ext.ops.block_attention import block_attention, block_key_ranges
from megatron_ext.ops.documents import document_runs
from megatron_ext.ops.meta import Meta, rope_length

__all__ = [
    "GENERIC_PLANS", "AttentionMethod", "BatchMeta", "BlockFn", "masked_block", "standard_offset",
]

GENERIC_PLANS = ("ring", "allgather", "a2a")
BlockFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Meta, Meta], tuple[torch.Tensor, torch.Tensor]
]
"""(q, k, v, query Meta, key Meta) -> fp32 (out, lse): what the context-parallel plans call."""


@dataclass(eq=False)
class BatchMeta:
    """What every layer needs to know about one batch, computed once per batch.

    ``meta`` describes this rank's tokens; under context parallelism ``metas`` holds every
    rank's (rank order) and ``rank`` is this rank's index. ``rope_len`` is the dynamic-NTK
    length of the global batch (``rope_length``). ``cache`` keeps per-batch plans that depend
    only on the metadata and a method's mask (halo plans, which ring steps see any key), so they
    are made once per batch rather than once per layer.
    """

    meta: Meta
    rope_len: int
    metas: tuple[Meta, ...] | None = None
    rank: int = 0
    cache: dict = field(default_factory=dict)


def standard_offset(qm: Meta, km: Meta, *, from_zero: bool = True) -> int | None:
    """q_offset when queries and keys are the plain packed layout ``attention_func`` takes.

    That is: keys are indices 0..Sk-1 of packed rows (documents are runs of equal ids, each
    given once), positions count up by one inside every document, and query row r is key
    index ``Sk - Sq + r``. With ``from_zero`` every document must also start at position 0
    (masks that read absolute positions, such as chunks, need it); without it a document
    continued from an earlier sample qualifies too, since causal, window and document masks
    only compare positions inside a document. Returns None otherwise (shards, padding, any
    other order).
    """
    sq, sk = qm.positions.shape[1], km.positions.shape[1]
    if sq > sk or qm.positions.shape[0] != km.positions.shape[0]:
        return None
    off = sk - sq
    ids, kpos = km.doc_ids, km.positions
    if sk > 1 and not bool((ids[:, 1:] >= ids[:, :-1]).all()):
        return None  # an id that comes back later names one document, not two runs
    _, pos = document_runs(ids)
    if from_zero:
        if not torch.equal(kpos, pos):
            return None
    elif not torch.equal(kpos - kpos.gather(1, (torch.arange(sk) - pos).clamp(min=0)), pos) or \
            bool((kpos < 0).any()):
        return None  # each document's positions must count up by one from its first token
    if not torch.equal(qm.positions, kpos[:, off:]):
        return None
    return off if torch.equal(qm.doc_ids, ids[:, off:]) else None


def masked_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qm: Meta,
    km: Meta,
    *,
    causal: bool,
    window: int | None,
    chunk: int | None,
    softmax_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of a query block against a key block -> fp32 (out, lse)."""
    return block_attention(
        q, k, v, q_positions=qm.positions, k_positions=km.positions, q_doc_ids=qm.doc_ids,
        k_doc_ids=km.doc_ids, causal=causal, window=window, chunk=chunk,
        softmax_scale=softmax_scale,
    )  # fmt: skip


class AttentionMethod:
    """Base class: subclasses set the attributes and implement the three methods below."""

    name: str = "attention"
    plans: tuple[str, ...] = GENERIC_PLANS
    """Context-parallel plans that honour the mask."""
    default_plan: str = "ring"
    refusal: str = "every query sees every earlier key of its document"
    """Why the other plans cannot honour the mask (for the error message)."""
    causal: bool = True
    window: int | None = None
    chunk: int | None = None
    softmax_scale: float | None = None

    def prepare_q(self, q: torch.Tensor, meta: Meta, rope_len: int) -> torch.Tensor:
        """Owner-side transform of queries [B, n, H, D] at ``meta``'s positions."""
        return q

    def prepare_kv(
        self, k: torch.Tensor, v: torch.Tensor, meta: Meta, rope_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Owner-side transform of keys and values [B, n, Hkv, D] (what travels under CP)."""
        return k, v

    def block(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qm: Meta, km: Meta,
        rope_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared queries against one block of prepared keys -> fp32 (out, lse).

        ``rope_len`` is the batch's dynamic-NTK length (for methods that rotate queries here).
        """
        return masked_block(
            q, k, v, qm, km, causal=self.causal, window=self.window, chunk=self.chunk,
            softmax_scale=self.softmax_scale,
        )  # fmt: skip

    def local_block(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qm: Meta, km: Meta,
        rope_len: int, need_lse: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole problem on one process: the plain packed layout takes ``attention_func``
        (whose backend dispatch reaches the fused CPU kernel, SDPA, flash-attn or Triton),
        anything else the block function. Output in q's dtype, lse fp32 (None when not needed
        and the backend gives none)."""
        off = standard_offset(qm, km, from_zero=self.chunk is not None)
        if off is None:
            return self.block(q, k, v, qm, km, rope_len)
        multi = bool((km.doc_ids != km.doc_ids[:, :1]).any())
        return attention_func(
            q, k, v, causal=self.causal, window=self.window, chunk=self.chunk,
            softmax_scale=self.softmax_scale, q_offset=off,
            doc_ids=km.doc_ids.to(q.device) if multi else None, need_lse=need_lse,
        )  # fmt: skip

    def sees_any(self, qm: Meta, km: Meta) -> bool:
        """Whether any query of ``qm`` sees any key of ``km`` (host-side; no device sync)."""
        _, lo, hi = block_key_ranges(
            qm.positions, km.positions, q_doc_ids=qm.doc_ids, k_doc_ids=km.doc_ids,
            causal=self.causal, window=self.window, chunk=self.chunk,
        )  # fmt: skip
        return bool((hi > lo).any())

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q_meta: Meta,
        k_meta: Meta,
        rope_len: int | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The method on one process: prologue on q and k, then the whole problem.

        Args:
            q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D] (raw: the method prepares them).
            q_meta, k_meta: their metadata (``token_meta``).
            rope_len: dynamic-NTK length; default ``rope_length`` over both metas.
            return_lse: also return the lse [B, H, Sq] (fp32, fp64 for fp64 inputs).

        Returns:
            out [B, Sq, H, D] in v's dtype (and the lse).
        """
        if rope_len is None:
            rope_len = rope_length([q_meta.positions, k_meta.positions])
        q = self.prepare_q(q, q_meta, rope_len)
        k, v = self.prepare_kv(k, v, k_meta, rope_len)
        out, lse = self.local_block(q, k, v, q_meta, k_meta, rope_len, need_lse=return_lse)
        out = out.to(v.dtype)
        return (out, lse) if return_lse else out

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BatchMeta
    ) -> torch.Tensor:
        """Self-attention of one batch's tokens on one process (what a layer calls)."""
        return self(q, k, v, q_meta=batch.meta, k_meta=batch.meta, rope_len=batch.rope_len)
