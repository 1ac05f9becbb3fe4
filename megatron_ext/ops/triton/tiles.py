"""Tile helpers of the Triton attention kernels: visibility intervals, tile ranges, dot product.

Every mask these kernels take gives each query position i one contiguous interval of visible
keys ``[lo_i, hi_i)`` and each key j one contiguous interval of query positions that see it
(docs/methods/conventions.md, "Masks", and megatron_ext/ops/dual_chunk/README.md):

- MODE 0 ("mask"): causal ``j <= i``, sliding window ``i - W < j``, same document (documents are
  runs; ``DS`` / ``DE`` hold each index's run start and end, int32 [B, Sk]);
- MODE 1 ("chunk"): DCA query variant ``var`` with chunk length C, n = i // C: 0 = intra
  ``[nC, i]``, 1 = successive ``[(n-1)C, nC)``, 2 = inter ``[0, (n-1)C)``. Variant 0 alone is
  chunked-local attention.

So a kernel computes the interval of each row (``row_interval``) or column (``col_interval``)
of its fixed block once, and ``span`` reduces them to two ranges along the walked axis:
``[lo, hi)``, seen by some element (tiles outside are skipped), and ``[flo, fhi)``, seen by
every element (tiles inside need no mask). ``split_range`` cuts ``[lo, hi)`` into a masked head,
an unmasked middle of whole tiles and a masked tail; the element mask of a fringe tile is two
comparisons against the intervals. Positions are never negative, so integer division means the
same on the GPU (truncation) and in the interpreter (floor).

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

__all__ = ["dot_precision", "kernels_interpreted", "triton_available"]


def triton_available() -> bool:
    """Whether triton could be imported."""
    return triton is not None


def kernels_interpreted() -> bool:
    """Whether the kernels run in the Triton interpreter (then they take CPU tensors).

    Read from the kernel objects: triton decorates them as interpreted functions when
    ``TRITON_INTERPRET=1`` was set before it was imported (the test conftest does this on CPU).
    """
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(split_range, InterpretedFunction)


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
    def span(lo_v, hi_v, ok, n):
        """([lo, hi), [flo, fhi)): union and intersection of the intervals where ok, in [0, n]."""
        some = ok & (lo_v < hi_v)
        lo = tl.min(tl.where(some, lo_v, n), 0)
        hi = tl.max(tl.where(some, hi_v, 0), 0)
        flo = tl.max(tl.where(ok, lo_v, 0), 0)
        fhi = tl.min(tl.where(ok, hi_v, n), 0)
        lo = tl.minimum(lo, n)
        return lo, tl.maximum(hi, lo), flo, tl.maximum(fhi, flo)

    @triton.jit
    def row_interval(
        i, ok, Sk, window, chunk_len, DS, DE, var,
        MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
    ):  # fmt: skip
        """Keys [lo, hi) seen by query positions i (a vector); empty where not ok."""
        zero = i * 0
        if MODE == 0:
            lo, hi = zero, zero + Sk
            if CAUSAL:
                hi = tl.minimum(hi, i + 1)
            if WINDOW:
                lo = tl.maximum(lo, i - window + 1)
            if HAS_DOC:
                lo = tl.maximum(lo, tl.load(DS + i, mask=ok, other=0))
                hi = tl.minimum(hi, tl.load(DE + i, mask=ok, other=0))
        else:
            start = i // chunk_len * chunk_len
            prev = tl.maximum(start - chunk_len, 0)
            lo = tl.where(var == 0, start, tl.where(var == 1, prev, zero))
            hi = tl.where(var == 0, i + 1, tl.where(var == 1, start, prev))
            hi = tl.minimum(hi, Sk)
        return lo, tl.where(ok, tl.maximum(hi, lo), lo)

    @triton.jit
    def col_interval(
        j, ok, q_offset, Sq, window, chunk_len, DS, DE, var,
        MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
    ):  # fmt: skip
        """Query ROWS (position - q_offset) [lo, hi) that see keys j (a vector), in [0, Sq]."""
        q_end = q_offset + Sq
        zero = j * 0
        if MODE == 0:
            lo, hi = zero + q_offset, zero + q_end
            if CAUSAL:
                lo = tl.maximum(lo, j)
            if WINDOW:
                hi = tl.minimum(hi, j + window)
            if HAS_DOC:
                lo = tl.maximum(lo, tl.load(DS + j, mask=ok, other=0))
                hi = tl.minimum(hi, tl.load(DE + j, mask=ok, other=0))
        else:  # query chunks m + var (var 0, 1), or m + 2 onwards (var 2), for key chunk m
            start = j // chunk_len * chunk_len
            lo = tl.where(var == 0, j, start + var * chunk_len)
            hi = tl.where(var == 2, zero + q_end, start + (var + 1) * chunk_len)
        lo = tl.minimum(tl.maximum(lo, q_offset), q_end) - q_offset
        hi = tl.minimum(tl.maximum(hi, q_offset), q_end) - q_offset
        return lo, tl.where(ok, tl.maximum(hi, lo), lo)
