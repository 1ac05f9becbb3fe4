"""KV caches per layer type: full, ring (sliding window / current chunk), and their step.

Every cache row is indexed by the tokens' own positions, so rows of a batch may have different
lengths: a row's token at position p lives in slot p (full cache) or p mod R (ring of R slots),
and the slot's recorded position (-1 = empty) is what the masks read. Positions are
per-document: with packed documents a row holds only its current document and is emptied
(``reset_rows``) when a new one starts (``documents.py``). A step

1. runs the layer method's prologue on the new tokens (RoPE, QK-norm, temperature, DCA's key
   rotation at ``j mod C``, CoCA's Q' and K') -- keys are prepared once, when they arrive;
2. attends the prepared queries to the cached keys plus the new ones at explicit positions
   (``LayerMethod.attend``: causal, window, chunk or DCA's three passes);
3. stores the new prepared keys and values.

``store`` and ``attend_cached`` are the step's two halves on their own: context-parallel
prefill (``cp_prefill.py``) attends a step's queries to the earlier keys with
``attend_cached`` and stores the keys every rank prepared with ``store``.

Memory per cached token and layer (Hkv KV heads of D dims, b bytes per element): full caches
hold 2·Hkv·D·b for every position; a ring holds 2·Hkv·D·b for only its last R positions (R = W
for a sliding window, R = c for chunked-local attention, whose visible keys all lie in the
current chunk), so it does not grow with the sequence. Nothing of size S x S is ever built.
"""

from __future__ import annotations

import torch

from megatron_ext.inference.attend import LayerMethod, meta_of
from megatron_ext.ops import Meta

__all__ = ["FullCache", "RingCache", "write_rows"]


def write_rows(
    store: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor
) -> None:
    """store[b, slots[b, i]] = values[b, i] where keep[b, i] (slots distinct per row).

    Args:
        store: [B, T, ...]; values: [B, n, ...]; slots, keep: [B, n] (CPU or store's device).
    """
    keep = keep.to(store.device)
    if not bool(keep.any()):
        return
    b = torch.arange(store.shape[0], device=store.device)[:, None].expand_as(keep)
    store[b[keep], slots.to(store.device)[keep]] = values[keep].to(store.dtype)


class FullCache:
    """Every prepared key and value of every row, slot = position.

    Args:
        batch: rows B. capacity: positions per row (the planned total length).
        kv_heads, head_dim: Hkv, D. dtype, device: of the stored tensors.
    """

    def __init__(self, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.k = torch.zeros(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.int64)
        self.end = 0  # one past the largest position stored

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty the given rows (a new document starts there): their slots become invisible."""
        self.pos[rows] = -1

    def step(self, lm: LayerMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             qm: Meta, lengths: torch.Tensor, rope_len: int) -> torch.Tensor:
        """Attention output [B, n, H, D] of new tokens (raw q, k, v [B, n, heads, D])."""
        pos = qm.positions
        qp = lm.prepare_q(q, qm, rope_len)
        self.store(*lm.prepare_kv(k, v, qm, rope_len), pos)
        out, _ = self.attend_cached(lm, qp, qm, lengths, rope_len)
        return out.to(v.dtype)

    def store(self, kp: torch.Tensor, vp: torch.Tensor, pos: torch.Tensor) -> None:
        """Write prepared keys and values [B, n, Hkv, D] at positions [B, n] (-1 = none)."""
        cap = self.k.shape[1]
        if int(pos.max()) >= cap:
            raise ValueError(f"position {int(pos.max())} is past the cache capacity {cap}; "
                             "create the session with a larger total length")
        keep = pos >= 0
        write_rows(self.k, kp, pos.clamp(min=0), keep)
        write_rows(self.v, vp, pos.clamp(min=0), keep)
        write_rows(self.pos, pos, pos.clamp(min=0), keep)
        self.end = max(self.end, int(pos.max()) + 1)

    def has_keys(self) -> bool:
        return self.end > 0

    def attend_cached(self, lm: LayerMethod, qp: torch.Tensor, qm: Meta, lengths: torch.Tensor,
                      rope_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared queries against every stored key -> fp32 (out, lse)."""
        hi = self.end
        km = meta_of(self.pos[:, :hi], lengths)
        return lm.attend(qp, self.k[:, :hi], self.v[:, :hi], qm, km, rope_len)


class RingCache:
    """The last ``size`` positions of every row (slot = position mod size).

    A sliding window W needs the W - 1 keys before a query and a chunked-local query the keys
    of its own chunk (fewer than c before it), so a ring of W (or c) slots holds every key a
    later query can see; older slots are overwritten.
    """

    def __init__(self, batch: int, size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.size = size
        self.k = torch.zeros(batch, size, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, size), -1, dtype=torch.int64)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty the given rows (a new document starts there): their slots become invisible."""
        self.pos[rows] = -1

    def step(self, lm: LayerMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             qm: Meta, lengths: torch.Tensor, rope_len: int) -> torch.Tensor:
        """Attention output [B, n, H, D] of new tokens (raw q, k, v [B, n, heads, D])."""
        pos = qm.positions
        qp = lm.prepare_q(q, qm, rope_len)
        kp, vp = lm.prepare_kv(k, v, qm, rope_len)
        # The ring (earlier keys) plus the block itself: every key a query of the block sees.
        keys = torch.cat((self.k, kp.to(self.k.dtype)), 1)
        vals = torch.cat((self.v, vp.to(self.v.dtype)), 1)
        km = meta_of(torch.cat((self.pos, pos), 1), lengths)
        out, _ = lm.attend(qp, keys, vals, qm, km, rope_len)
        self.store(kp, vp, pos)
        return out.to(v.dtype)

    def store(self, kp: torch.Tensor, vp: torch.Tensor, pos: torch.Tensor) -> None:
        """Keep each row's last ``size`` positions of prepared keys and values [B, n, Hkv, D]
        at positions [B, n] (-1 = none); their slots are distinct."""
        top = pos.max(dim=1, keepdim=True).values
        keep = (pos >= 0) & (pos > top - self.size)
        slots = pos.clamp(min=0) % self.size
        write_rows(self.k, kp, slots, keep)
        write_rows(self.v, vp, slots, keep)
        write_rows(self.pos, pos, slots, keep)

    def has_keys(self) -> bool:
        return bool((self.pos >= 0).any())

    def attend_cached(self, lm: LayerMethod, qp: torch.Tensor, qm: Meta, lengths: torch.Tensor,
                      rope_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared queries against the keys in the ring -> fp32 (out, lse)."""
        return lm.attend(qp, self.k, self.v, qm, meta_of(self.pos, lengths), rope_len)
