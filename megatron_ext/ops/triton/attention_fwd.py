"""Triton flash-attention forward returning (out, lse), for plain masks and DCA query variants.

One program owns ``BLOCK_M`` query rows of one query head (GQA: it reads KV head
``h // (H // Hkv)``) and walks the key tiles they can see with a single online softmax in fp32
(fp64 for fp64 inputs) in the exp2 domain. Each row sees one key interval; key tiles nobody
sees are skipped, tiles everybody sees run without a mask (``tiles.py``).

The kernel takes a stack of query variants [NV, B, Sq, H, D]. Plain attention passes one.
Dual Chunk Attention (megatron_ext/ops/dual_chunk/README.md) passes the intra / successive /
inter rotations of q and one key tensor K' rotated at ``j mod C``: for each variant the program
visits the key tiles where some of its rows have the matching ``delta = i // C - j // C``
(0, 1, >= 2), loads that variant of its query block once, and adds the tile to the same running
max / sum. A tile that straddles a chunk boundary is visited once per variant with complementary
masks, so every (i, j) pair is counted exactly once and DCA costs the FLOPs of causal attention
plus its boundary tiles.

Rows with no visible key end with ``l == 0``: out 0, lse -inf (never NaN).
"""

from __future__ import annotations

import torch

from megatron_ext.ops.triton.tiles import dot_precision, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from megatron_ext.ops.triton.tiles import dot, row_interval, span, split_range

__all__ = ["LOG2E", "attention_fwd"]

LOG2E = 1.4426950408889634

if triton_available():
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _fwd_tiles(
        acc, m_i, l_i, q, K, V, kv_row, start, end, lo_r, hi_r, Sk, qk_scale,
        MASKED: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        # K, V point at key 0 of this (batch, KV head); in-tile offsets are small int32s and
        # the tile start is a 64-bit scalar (per-element 64-bit offsets would cost registers).
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        row64 = kv_row.to(tl.int64)
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + offs_n
            kt_ptr = K + start_n * row64 + (offs_n[None, :] * kv_row + offs_d[:, None])
            if MASKED:
                kt = tl.load(kt_ptr, mask=(cols < Sk)[None, :], other=0.0)  # [D, BLOCK_N]
            else:
                kt = tl.load(kt_ptr)
            s = dot(q, kt, acc.dtype, PREC) * qk_scale
            if MASKED:  # row r sees keys [lo_r, hi_r)
                vis = (cols[None, :] >= lo_r[:, None]) & (cols[None, :] < hi_r[:, None])
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptr = V + start_n * row64 + (offs_n[:, None] * kv_row + offs_d[None, :])
            if MASKED:
                vt = tl.load(v_ptr, mask=(cols < Sk)[:, None], other=0.0)  # [BLOCK_N, D]
            else:
                vt = tl.load(v_ptr)
            acc = acc * alpha[:, None] + dot(p.to(vt.dtype), vt, acc.dtype, PREC)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, DOCS, DOCE,
        Sq, Sk, H, HKV, q_offset, window, chunk_len, qk_scale, q_vstride,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NV: tl.constexpr,
        MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
        PREC: tl.constexpr, F64: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest causal tiles first
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        g = h // (H // HKV)
        r0 = pid_m * BLOCK_M
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < Sq
        q_base = ((b * Sq + r0).to(tl.int64) * H + h) * D  # 64-bit scalar; tile offsets int32
        kv_row = HKV * D
        kv_base = b.to(tl.int64) * Sk * kv_row + g * D
        DS = DOCS + b.to(tl.int64) * Sk
        DE = DOCE + b.to(tl.int64) * Sk
        acc_t = tl.float64 if F64 else tl.float32
        acc = tl.zeros([BLOCK_M, D], dtype=acc_t)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_t)
        l_i = tl.zeros([BLOCK_M], dtype=acc_t)
        vstride = q_vstride.to(tl.int64)
        # Variants unrolled: a runtime loop around the pipelined key loops spills registers on
        # sm_90 (benchmarks/triton_resources.py). Arguments are passed one by one below: the
        # compiler cannot pack constexpr strings into tuples.
        for var in tl.static_range(NV):
            q_ptr = tl.arange(0, BLOCK_M)[:, None] * (H * D) + tl.arange(0, D)[None, :]
            q = tl.load(Q + var * vstride + q_base + q_ptr, mask=row_ok[:, None], other=0.0)
            lo_r, hi_r = row_interval(
                q_offset + rows, row_ok, Sk, window, chunk_len, DS, DE, var, MODE, CAUSAL,
                WINDOW, HAS_DOC,
            )  # fmt: skip
            lo, hi, flo, fhi = span(lo_r, hi_r, row_ok, Sk)
            start, l1, l2 = split_range(lo, hi, flo, fhi, BLOCK_N)
            Kb = K + kv_base
            Vb = V + kv_base
            acc, m_i, l_i = _fwd_tiles(
                acc, m_i, l_i, q, Kb, Vb, kv_row, start, l1, lo_r, hi_r, Sk, qk_scale, True,
                BLOCK_N, D, PREC,
            )  # fmt: skip
            acc, m_i, l_i = _fwd_tiles(
                acc, m_i, l_i, q, Kb, Vb, kv_row, l1, l2, lo_r, hi_r, Sk, qk_scale, False,
                BLOCK_N, D, PREC,
            )  # fmt: skip
            acc, m_i, l_i = _fwd_tiles(
                acc, m_i, l_i, q, Kb, Vb, kv_row, l2, hi, lo_r, hi_r, Sk, qk_scale, True,
                BLOCK_N, D, PREC,
            )  # fmt: skip
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
        o_ptr = tl.arange(0, BLOCK_M)[:, None] * (H * D) + tl.arange(0, D)[None, :]
        tl.store(O + q_base + o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + (b * H + h).to(tl.int64) * Sq + rows, lse, mask=row_ok)


def attention_fwd(
    qs: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_offset: int,
    mode: int,
    causal: bool,
    window: int | None,
    chunk_len: int,
    docs: tuple[torch.Tensor, torch.Tensor] | None,
    config: dict,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on contiguous inputs (validated by ``interface.py``).

    Args:
        qs: [NV, B, Sq, H, D] query variants stacked: NV = 1 (plain), or 3 (DCA intra /
            successive / inter).
        k, v: [B, Sk, Hkv, D].
        scale: softmax scale (temperatures included).
        q_offset: absolute position of query row 0.
        mode: 0 = causal / window / document masks, 1 = chunk variants (see ``tiles.py``).
        causal, window: mode-0 masks.
        chunk_len: C for mode 1 (ignored otherwise).
        docs: (starts, ends) int32 [B, Sk] document bounds, or None.
        config: BLOCK_M, BLOCK_N, num_warps, num_stages.
        out_dtype: dtype of out (default q's; fp32 keeps partial results exact for merging).

    Returns:
        out [B, Sq, H, D] in ``out_dtype``; lse [B, H, Sq] fp32 (fp64 for fp64 inputs).
    """
    NV, B, Sq, H, D = qs.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    f64 = qs.dtype == torch.float64
    out = torch.empty_like(qs[0], dtype=out_dtype or qs.dtype)
    lse = torch.empty(B, H, Sq, dtype=torch.float64 if f64 else torch.float32, device=qs.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    ds, de = docs if docs is not None else (k, k)  # never read without HAS_DOC
    grid = (triton.cdiv(Sq, config["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        qs, k, v, out, lse, ds, de,
        Sq, Sk, H, Hkv, q_offset, window or 0, max(chunk_len, 1), scale * LOG2E, out.numel(),
        D=D, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], NV=NV, MODE=mode,
        CAUSAL=causal, WINDOW=window is not None, HAS_DOC=docs is not None,
        PREC=dot_precision(qs), F64=f64,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out, lse
