"""Tile helpers of the Triton attention kernels: visited ranges, element masks, the dot product.

Every kernel walks one axis in tiles (keys for the forward and dq kernels, queries for the dk/dv
kernel) and needs, for its fixed block on the other axis, two ranges:

- ``[lo, hi)``: positions that at least one element of the fixed block can see (tiles outside
  are never visited);
- ``[flo, fhi)``: positions that every element of the fixed block sees (tiles inside need no
  mask at all).

``split_range`` cuts ``[lo, hi)`` into a masked head, an unmasked middle of whole tiles and a
masked tail, so the element mask of ``visible`` is evaluated only on fringe tiles.

Two families of masks (../shared/METHODS.md §0 and §5), chosen by the constexpr ``MODE``:

- MODE 0 ("mask"): causal ``j <= i``, sliding window ``i - W < j``, same document (documents
  given as per-index run starts ``DS`` and ends ``DE``, both [B, Sk] int32);
- MODE 1 ("chunk"): DCA query variant ``VARIANT`` with chunk length C and
  ``delta = i // C - j // C``: 0 = intra (``delta == 0`` and ``j <= i``), 1 = successive
  (``delta == 1``), 2 = inter (``delta >= 2``). Variant 0 alone is chunked-local attention.

Positions are absolute (query row r sits at ``q_offset + r``) and never negative, so integer
division has the same meaning on the GPU (truncation) and in the interpreter (floor).

``dot`` wraps ``tl.dot``: the Triton interpreter (3.x) stores bf16 as uint16 and multiplies the
raw bits in ``tl.dot``, so on CPU (``PREC="upcast"``) bf16 operands are converted to fp32 first.
That is what the tensor cores compute anyway (exact bf16 products, fp32 accumulation).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = ["dot_precision", "triton_available"]


def triton_available() -> bool:
    """Whether triton could be imported."""
    return triton is not None


def dot_precision(x: torch.Tensor) -> str:
    """The ``PREC`` constexpr of ``dot`` for inputs like x.

    fp32 / fp64: "ieee" (no TF32 rounding, so fp32 results match an fp32 reference); bf16 on CPU
    (the interpreter): "upcast"; fp16 / bf16 on the GPU: "tf32" (ignored for 16-bit operands).
    """
    if x.dtype in (torch.float32, torch.float64):
        return "ieee"
    return "upcast" if x.device.type == "cpu" and x.dtype == torch.bfloat16 else "tf32"


if triton is not None:

    @triton.jit
    def dot(a, b, acc_dtype: tl.constexpr, PREC: tl.constexpr):
        """a @ b accumulated in acc_dtype; PREC is tl.dot's input_precision, or "upcast"."""
        if PREC == "upcast":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), out_dtype=acc_dtype)
        return tl.dot(a, b, input_precision=PREC, out_dtype=acc_dtype)

    @triton.jit
    def split_range(lo, hi, flo, fhi, BLOCK: tl.constexpr):
        """Tile starts: masked [start, l1), unmasked [l1, l2), masked [l2, hi); all >= 0."""
        start = lo // BLOCK * BLOCK
        mid_lo = (flo + BLOCK - 1) // BLOCK * BLOCK  # first tile starting inside [flo, fhi)
        mid_hi = fhi // BLOCK * BLOCK  # end of the last tile ending inside it
        l1 = tl.minimum(tl.maximum(mid_lo, start), hi)
        l2 = tl.minimum(tl.maximum(mid_hi, l1), hi)
        return start, l1, l2

    @triton.jit
    def key_range(
        a0, a1, Sk, window, chunk_len, DS, DE,
        VARIANT: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
    ):  # fmt: skip
        """Keys seen by some / every query at absolute positions a0..a1 (a0 <= a1 < Sk when
        causal); DS, DE point at this batch row's document bounds."""
        zero = a0 * 0
        if MODE == 0:
            lo, hi, flo, fhi = zero, zero + Sk, zero, zero + Sk
            if CAUSAL:
                hi = tl.minimum(hi, a1 + 1)
                fhi = tl.minimum(fhi, a0 + 1)
            if WINDOW:
                lo = tl.maximum(lo, a0 - window + 1)
                flo = tl.maximum(flo, a1 - window + 1)
            if HAS_DOC:
                lo = tl.maximum(lo, tl.load(DS + a0))
                hi = tl.minimum(hi, tl.load(DE + a1))
                flo = tl.maximum(flo, tl.load(DS + a1))
                fhi = tl.minimum(fhi, tl.load(DE + a0))
        else:
            n0 = a0 // chunk_len
            n1 = a1 // chunk_len
            if VARIANT == 0:  # own chunk, causal
                lo, hi = n0 * chunk_len, a1 + 1
                flo, fhi = n1 * chunk_len, a0 + 1
            elif VARIANT == 1:  # previous chunk
                lo, hi = tl.maximum(n0 - 1, 0) * chunk_len, n1 * chunk_len
                flo, fhi = tl.maximum(n1 - 1, 0) * chunk_len, n0 * chunk_len
            else:  # all older chunks
                lo, hi = zero, tl.maximum(n1 - 1, 0) * chunk_len
                flo, fhi = zero, tl.maximum(n0 - 1, 0) * chunk_len
            hi = tl.minimum(hi, Sk)
            fhi = tl.minimum(fhi, Sk)
        return lo, hi, flo, tl.maximum(fhi, flo)

    @triton.jit
    def query_range(
        j0, j1, q_offset, Sq, window, chunk_len, DS, DE,
        VARIANT: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
    ):  # fmt: skip
        """Query ROWS (not positions) that see some / every key j0..j1, clipped to [0, Sq)."""
        q_end = q_offset + Sq
        if MODE == 0:
            lo, hi, flo, fhi = j0 * 0 + q_offset, j0 * 0 + q_end, j0 * 0 + q_offset, j0 * 0 + q_end
            if CAUSAL:
                lo = tl.maximum(lo, j0)
                flo = tl.maximum(flo, j1)
            if WINDOW:
                hi = tl.minimum(hi, j1 + window)
                fhi = tl.minimum(fhi, j0 + window)
            if HAS_DOC:
                lo = tl.maximum(lo, tl.load(DS + j0))
                hi = tl.minimum(hi, tl.load(DE + j1))
                flo = tl.maximum(flo, tl.load(DS + j1))
                fhi = tl.minimum(fhi, tl.load(DE + j0))
        else:
            m0 = j0 // chunk_len
            m1 = j1 // chunk_len
            if VARIANT == 0:
                lo, hi = j0, (m1 + 1) * chunk_len
                flo, fhi = j1, (m0 + 1) * chunk_len
            elif VARIANT == 1:
                lo, hi = (m0 + 1) * chunk_len, (m1 + 2) * chunk_len
                flo, fhi = (m1 + 1) * chunk_len, (m0 + 2) * chunk_len
            else:
                lo, hi = (m0 + 2) * chunk_len, j0 * 0 + q_end
                flo, fhi = (m1 + 2) * chunk_len, j0 * 0 + q_end
        lo = tl.minimum(tl.maximum(lo, q_offset), q_end) - q_offset
        hi = tl.minimum(tl.maximum(hi, q_offset), q_end) - q_offset
        flo = tl.minimum(tl.maximum(flo, q_offset), q_end) - q_offset
        fhi = tl.minimum(tl.maximum(fhi, q_offset), q_end) - q_offset
        return lo, tl.maximum(hi, lo), flo, tl.maximum(fhi, flo)

    @triton.jit
    def visible(
        i, j, q_end, Sk, window, chunk_len, ds_i, ds_j,
        VARIANT: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
    ):  # fmt: skip
        """Boolean tile: query position i (broadcast) sees key j; out-of-range rows/cols False.

        ds_i, ds_j: document starts of i and j (ignored unless HAS_DOC).
        """
        ok = (i < q_end) & (j < Sk)
        if MODE == 0:
            if CAUSAL:
                ok = ok & (j <= i)
            if WINDOW:
                ok = ok & (j > i - window)
            if HAS_DOC:
                ok = ok & (ds_i == ds_j)
        else:
            delta = i // chunk_len - j // chunk_len
            if VARIANT == 0:
                ok = ok & (delta == 0) & (j <= i)
            elif VARIANT == 1:
                ok = ok & (delta == 1)
            else:
                ok = ok & (delta >= 2)
        return ok
