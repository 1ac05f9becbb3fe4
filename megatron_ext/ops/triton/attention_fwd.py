"""Triton flash-attention forward returning (out, lse), for plain masks and DCA query variants.

One program owns ``BLOCK_M`` query rows of one query head (GQA: it reads KV head
``h // (H // Hkv)``) and walks the key tiles they can see with a single online softmax in fp32
(fp64 for fp64 inputs) in the exp2 domain. Key tiles nobody sees are skipped; tiles everybody
sees run without a mask (``tiles.py``).

The kernel takes up to three query tensors with the same layout. Plain attention passes one.
Dual Chunk Attention (../shared/METHODS.md §5) passes the intra / successive / inter rotations
of q and one key tensor K' rotated at ``j mod C``: for each variant the program visits the key
tiles where some of its rows have the matching ``delta = i // C - j // C`` (0, 1, >= 2), loads
that variant of its query block once, and adds the tile to the same running max / sum. A tile
that straddles a chunk boundary is visited once per variant with complementary masks, so every
(i, j) pair is counted exactly once and DCA costs the FLOPs of causal attention plus its
boundary tiles.

Rows with no visible key end with ``l == 0``: out 0, lse -inf (never NaN).
"""

from __future__ import annotations

import torch

from megatron_ext.ops.triton.tiles import dot_precision, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from megatron_ext.ops.triton.tiles import dot, key_range, split_range, visible

__all__ = ["LOG2E", "attention_fwd"]

LOG2E = 1.4426950408889634

if triton_available():
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _fwd_tiles(
        acc, m_i, l_i, q, K, V, kv_row, kv_base, start, end, i_abs, q_end, Sk, window,
        chunk_len, qk_scale, ds_i, DS,
        MASKED: tl.constexpr, VARIANT: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + offs_n
            ptr = kv_base + cols.to(tl.int64)[None, :] * kv_row + offs_d[:, None]
            if MASKED:
                kt = tl.load(K + ptr, mask=(cols < Sk)[None, :], other=0.0)  # [D, BLOCK_N]
            else:
                kt = tl.load(K + ptr)
            s = dot(q, kt, acc.dtype, PREC) * qk_scale
            if MASKED:
                ds_j = ds_i
                if HAS_DOC:
                    ds_j = tl.load(DS + cols, mask=cols < Sk, other=-1)[None, :]
                vis = visible(
                    i_abs[:, None], cols[None, :], q_end, Sk, window, chunk_len, ds_i, ds_j,
                    VARIANT, MODE, CAUSAL, WINDOW, HAS_DOC,
                )  # fmt: skip
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vptr = kv_base + cols.to(tl.int64)[:, None] * kv_row + offs_d[None, :]
            if MASKED:
                vt = tl.load(V + vptr, mask=(cols < Sk)[:, None], other=0.0)  # [BLOCK_N, D]
            else:
                vt = tl.load(V + vptr)
            acc = acc * alpha[:, None] + dot(p.to(vt.dtype), vt, acc.dtype, PREC)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd_kernel(
        Q0, Q1, Q2, K, V, O, LSE, DOCS, DOCE,
        Sq, Sk, H, HKV, q_offset, window, chunk_len, qk_scale,
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
        offs_d = tl.arange(0, D)
        row_ok = rows < Sq
        q_ptr = ((b * Sq + rows).to(tl.int64) * H + h) * D
        q_ptr = q_ptr[:, None] + offs_d[None, :]
        kv_row = HKV * D
        kv_base = b.to(tl.int64) * Sk * kv_row + g * D
        a0 = q_offset + r0
        a1 = q_offset + tl.minimum(r0 + BLOCK_M, Sq) - 1
        i_abs = q_offset + rows
        q_end = q_offset + Sq
        DS = DOCS + b.to(tl.int64) * Sk
        DE = DOCE + b.to(tl.int64) * Sk
        ds_i = i_abs[:, None]
        if HAS_DOC:
            ds_i = tl.load(DS + i_abs, mask=row_ok, other=-2)[:, None]
        acc_t = tl.float64 if F64 else tl.float32
        acc = tl.zeros([BLOCK_M, D], dtype=acc_t)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_t)
        l_i = tl.zeros([BLOCK_M], dtype=acc_t)
        for var in tl.static_range(NV):
            if var == 0:
                q = tl.load(Q0 + q_ptr, mask=row_ok[:, None], other=0.0)
            elif var == 1:
                q = tl.load(Q1 + q_ptr, mask=row_ok[:, None], other=0.0)
            else:
                q = tl.load(Q2 + q_ptr, mask=row_ok[:, None], other=0.0)
            lo, hi, flo, fhi = key_range(
                a0, a1, Sk, window, chunk_len, DS, DE, var, MODE, CAUSAL, WINDOW, HAS_DOC
            )
            start, l1, l2 = split_range(lo, hi, flo, fhi, BLOCK_N)
            args = (q, K, V, kv_row, kv_base)
            rest = (i_abs, q_end, Sk, window, chunk_len, qk_scale, ds_i, DS)
            flags = (var, MODE, CAUSAL, WINDOW, HAS_DOC, BLOCK_N, D, PREC)
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *args, start, l1, *rest, True, *flags)
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *args, l1, l2, *rest, False, *flags)
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *args, l2, hi, *rest, True, *flags)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
        tl.store(O + q_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + (b * H + h).to(tl.int64) * Sq + rows, lse, mask=row_ok)


def attention_fwd(
    qs: tuple[torch.Tensor, ...],
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on contiguous inputs (validated by ``interface.py``).

    Args:
        qs: 1 or 3 query tensors [B, Sq, H, D] (3 = DCA intra / successive / inter).
        k, v: [B, Sk, Hkv, D].
        scale: softmax scale (temperatures included).
        q_offset: absolute position of query row 0.
        mode: 0 = causal / window / document masks, 1 = chunk variants (see ``tiles.py``).
        causal, window: mode-0 masks.
        chunk_len: C for mode 1 (ignored otherwise).
        docs: (starts, ends) int32 [B, Sk] document bounds, or None.
        config: BLOCK_M, BLOCK_N, num_warps, num_stages.

    Returns:
        out [B, Sq, H, D] in q's dtype; lse [B, H, Sq] fp32 (fp64 for fp64 inputs).
    """
    q0 = qs[0]
    B, Sq, H, D = q0.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    f64 = q0.dtype == torch.float64
    out = torch.empty_like(q0)
    lse = torch.empty(B, H, Sq, dtype=torch.float64 if f64 else torch.float32, device=q0.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    q1, q2 = (qs[1], qs[2]) if len(qs) == 3 else (q0, q0)
    ds, de = docs if docs is not None else (k, k)  # never read without HAS_DOC
    grid = (triton.cdiv(Sq, config["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q0, q1, q2, k, v, out, lse, ds, de,
        Sq, Sk, H, Hkv, q_offset, window or 0, max(chunk_len, 1), scale * LOG2E,
        D=D, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], NV=len(qs), MODE=mode,
        CAUSAL=causal, WINDOW=window is not None, HAS_DOC=docs is not None,
        PREC=dot_precision(q0), F64=f64,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out, lse
