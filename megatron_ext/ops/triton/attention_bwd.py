"""Triton flash-attention backward: exact dq (per query variant), dk and dv, no atomics.

Maths (docs/methods/conventions.md, "Attention backward"): with P = exp(z - lse) recomputed
from the saved lse,

    D_i = rowsum(dO_i * O_i) - dlse_i                  (``_attn_bwd_preprocess_kernel``)
    dV  = P^T dO,  dZ = P * (dO V^T - D),  dK = scale dZ^T Q   (``_attn_bwd_dkdv_kernel``)
    dQ  = scale dZ K                                    (``_attn_bwd_dq_kernel``)

The dlse term makes gradients exact also when lse is used downstream (partial results merged by
autograd, DCA passes, context parallelism).

- dk/dv: one program per (key tile, KV head) loops over the ``H / Hkv`` query heads of its group
  and over the query tiles that see the key tile, accumulating in fp32 registers; each dk/dv
  element is written once by one program.
- dq: one program per (query tile, query head) walks the key tiles like the forward. With DCA's
  three query variants it runs one accumulator per variant and writes dq_intra, dq_succ and
  dq_inter separately into the stacked gradient (each pair (i, j) contributes to exactly one of
  them), so the caller's autograd rotates each back with its own RoPE.

Rows with lse = -inf (nothing visible) are read as lse = +inf, which makes their P exactly 0;
query rows past Sq load lse = +inf and dO = 0 for the same reason.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.triton.attention_fwd import LOG2E
from megatron_ext.ops.triton.tiles import dot_precision, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from megatron_ext.ops.triton.tiles import col_interval, dot, row_interval, span, split_range

__all__ = ["attention_bwd"]

if triton_available():

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O, DO, DLSE, DELTA, Sq, H, D: tl.constexpr, BLOCK_M: tl.constexpr,
        HAS_DLSE: tl.constexpr, F64: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = rows < Sq
        ptr = (((b * Sq + rows).to(tl.int64) * H + h) * D)[:, None] + tl.arange(0, D)[None, :]
        acc_t = tl.float64 if F64 else tl.float32
        o = tl.load(O + ptr, mask=ok[:, None], other=0.0).to(acc_t)
        do = tl.load(DO + ptr, mask=ok[:, None], other=0.0).to(acc_t)
        delta = tl.sum(o * do, 1)
        lse_ptr = (b * H + h).to(tl.int64) * Sq + rows
        if HAS_DLSE:
            delta -= tl.load(DLSE + lse_ptr, mask=ok, other=0.0).to(acc_t)
        tl.store(DELTA + lse_ptr, delta, mask=ok)

    @triton.jit
    def _dkdv_tiles(
        dk, dv, k, v, Q, DO, LSE, DELTA, q_row, start, end, lo_c, hi_c, Sq, qk_scale,
        MASKED: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        # Q, DO point at row 0 of this (batch, head); LSE, DELTA at its [Sq] row. Key c of the
        # tile is seen by query rows [lo_c, hi_c).
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row64 = q_row.to(tl.int64)
        for start_m in range(start, end, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < Sq
            qt_ptr = Q + start_m * row64 + (offs_m[None, :] * q_row + offs_d[:, None])
            qt = tl.load(qt_ptr, mask=row_ok[None, :], other=0.0)  # [D, BLOCK_M]
            lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            st = dot(k, qt, dk.dtype, PREC) * qk_scale
            pt = tl.exp2(st - lse[None, :])  # [BLOCK_N, BLOCK_M]
            if MASKED:
                vis = (rows[None, :] >= lo_c[:, None]) & (rows[None, :] < hi_c[:, None])
                pt = tl.where(vis, pt, 0.0)
            do_ptr = DO + start_m * row64 + (offs_m[:, None] * q_row + offs_d[None, :])
            do = tl.load(do_ptr, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
            dv += dot(pt.to(do.dtype), do, dv.dtype, PREC)
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
            dpt = dot(v, tl.trans(do), dk.dtype, PREC)
            dst = pt * (dpt - delta[None, :])
            dk += dot(dst.to(qt.dtype), tl.trans(qt), dk.dtype, PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, DOCS, DOCE,
        Sq, Sk, H, HKV, q_offset, window, chunk_len, scale, qk_scale, q_vstride,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NV: tl.constexpr,
        MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
        PREC: tl.constexpr, F64: tl.constexpr,
    ):  # fmt: skip
        bg = tl.program_id(1)
        b = bg // HKV
        g = bg % HKV
        n_rep = H // HKV
        j0 = tl.program_id(0) * BLOCK_N
        j_abs = j0 + tl.arange(0, BLOCK_N)
        col_ok = j_abs < Sk
        kv_base = ((b * Sk + j0).to(tl.int64) * HKV + g) * D  # 64-bit scalar; tile offsets int32
        kv_ptr = tl.arange(0, BLOCK_N)[:, None] * (HKV * D) + tl.arange(0, D)[None, :]
        k = tl.load(K + kv_base + kv_ptr, mask=col_ok[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(V + kv_base + kv_ptr, mask=col_ok[:, None], other=0.0)
        DS = DOCS + b.to(tl.int64) * Sk
        DE = DOCE + b.to(tl.int64) * Sk
        acc_t = tl.float64 if F64 else tl.float32
        dk = tl.zeros([BLOCK_N, D], dtype=acc_t)
        dv = tl.zeros([BLOCK_N, D], dtype=acc_t)
        q_row = H * D
        vstride = q_vstride.to(tl.int64)
        for var in tl.static_range(NV):
            lo_c, hi_c = col_interval(
                j_abs, col_ok, q_offset, Sq, window, chunk_len, DS, DE, var, MODE, CAUSAL,
                WINDOW, HAS_DOC,
            )  # fmt: skip
            lo, hi, flo, fhi = span(lo_c, hi_c, col_ok, Sq)
            start, l1, l2 = split_range(lo, hi, flo, fhi, BLOCK_M)
            for hq in range(0, n_rep):  # the query heads of this KV head's group
                h = g * n_rep + hq
                q_base = b.to(tl.int64) * Sq * q_row + h * D
                l_base = (b * H + h).to(tl.int64) * Sq
                Qv = Q + var * vstride + q_base
                dk, dv = _dkdv_tiles(
                    dk, dv, k, v, Qv, DO + q_base, LSE + l_base, DELTA + l_base, q_row, start,
                    l1, lo_c, hi_c, Sq, qk_scale, True, BLOCK_M, D, PREC,
                )  # fmt: skip
                dk, dv = _dkdv_tiles(
                    dk, dv, k, v, Qv, DO + q_base, LSE + l_base, DELTA + l_base, q_row, l1, l2,
                    lo_c, hi_c, Sq, qk_scale, False, BLOCK_M, D, PREC,
                )  # fmt: skip
                dk, dv = _dkdv_tiles(
                    dk, dv, k, v, Qv, DO + q_base, LSE + l_base, DELTA + l_base, q_row, l2, hi,
                    lo_c, hi_c, Sq, qk_scale, True, BLOCK_M, D, PREC,
                )  # fmt: skip
        out_ptr = tl.arange(0, BLOCK_N)[:, None] * (HKV * D) + tl.arange(0, D)[None, :]
        dk = (dk * scale).to(DK.dtype.element_ty)
        tl.store(DK + kv_base + out_ptr, dk, mask=col_ok[:, None])
        tl.store(DV + kv_base + out_ptr, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])

    @triton.jit
    def _dq_tiles(
        dq, q, do, lse, delta, K, V, kv_row, start, end, lo_r, hi_r, Sk, qk_scale,
        MASKED: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        row64 = kv_row.to(tl.int64)
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + offs_n
            tile = start_n * row64
            kt_offs = offs_n[None, :] * kv_row + offs_d[:, None]  # [D, BLOCK_N]
            if MASKED:
                kt = tl.load(K + tile + kt_offs, mask=(cols < Sk)[None, :], other=0.0)
                vt = tl.load(V + tile + kt_offs, mask=(cols < Sk)[None, :], other=0.0)
            else:
                kt = tl.load(K + tile + kt_offs)
                vt = tl.load(V + tile + kt_offs)
            s = dot(q, kt, dq.dtype, PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            if MASKED:
                vis = (cols[None, :] >= lo_r[:, None]) & (cols[None, :] < hi_r[:, None])
                p = tl.where(vis, p, 0.0)
            dp = dot(do, vt, dq.dtype, PREC)
            ds = p * (dp - delta[:, None])
            dq += dot(ds.to(kt.dtype), tl.trans(kt), dq.dtype, PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DOCS, DOCE,
        Sq, Sk, H, HKV, q_offset, window, chunk_len, scale, qk_scale, q_vstride,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NV: tl.constexpr,
        MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
        PREC: tl.constexpr, F64: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        g = h // (H // HKV)
        r0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heaviest tiles first
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < Sq
        q_base = ((b * Sq + r0).to(tl.int64) * H + h) * D  # 64-bit scalar; tile offsets int32
        q_ptr = tl.arange(0, BLOCK_M)[:, None] * (H * D) + tl.arange(0, D)[None, :]
        kv_row = HKV * D
        kv_base = b.to(tl.int64) * Sk * kv_row + g * D
        l_ptr = (b * H + h).to(tl.int64) * Sq + rows
        do = tl.load(DO + q_base + q_ptr, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + l_ptr, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + l_ptr, mask=row_ok, other=0.0)
        DS = DOCS + b.to(tl.int64) * Sk
        DE = DOCE + b.to(tl.int64) * Sk
        acc_t = tl.float64 if F64 else tl.float32
        vstride = q_vstride.to(tl.int64)
        for var in tl.static_range(NV):  # one dq per variant, each written once
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
            dq = tl.zeros([BLOCK_M, D], dtype=acc_t)
            dq = _dq_tiles(
                dq, q, do, lse, delta, Kb, Vb, kv_row, start, l1, lo_r, hi_r, Sk, qk_scale, True,
                BLOCK_N, D, PREC,
            )  # fmt: skip
            dq = _dq_tiles(
                dq, q, do, lse, delta, Kb, Vb, kv_row, l1, l2, lo_r, hi_r, Sk, qk_scale, False,
                BLOCK_N, D, PREC,
            )  # fmt: skip
            dq = _dq_tiles(
                dq, q, do, lse, delta, Kb, Vb, kv_row, l2, hi, lo_r, hi_r, Sk, qk_scale, True,
                BLOCK_N, D, PREC,
            )  # fmt: skip
            dq = (dq * scale).to(DQ.dtype.element_ty)
            tl.store(DQ + var * vstride + q_base + q_ptr, dq, mask=row_ok[:, None])


def attention_bwd(
    qs: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    *,
    scale: float,
    q_offset: int,
    mode: int,
    causal: bool,
    window: int | None,
    chunk_len: int,
    docs: tuple[torch.Tensor, torch.Tensor] | None,
    config: dict,
    col_docs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels on contiguous tensors (arguments as ``attention_fwd``).

    Args:
        out, lse: the forward's outputs; dout: [B, Sq, H, D]; dlse: [B, H, Sq] or None.
        config: BLOCK_M_DQ / BLOCK_N_DQ of the dq kernel, BLOCK_M_KV / BLOCK_N_KV of the
            dk/dv kernel, num_warps, num_stages (``num_warps_bwd`` / ``num_stages_bwd`` when
            the backward wants others than the forward).
        col_docs: bounds read by the dk/dv kernel in place of ``docs`` (the query rows that see
            each key, when they are not the key's document: per-row key intervals).

    Returns:
        (dqs, dk, dv): dqs [NV, B, Sq, H, D] (one gradient per query variant) in q's dtype,
        dk and dv in k's dtype.
    """
    NV, B, Sq, H, D = qs.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    f64 = qs.dtype == torch.float64
    dqs = torch.empty_like(qs)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if Sq == 0 or B * H == 0 or Sk == 0:
        for t in (dqs, dk, dv):
            t.zero_()
        return dqs, dk, dv
    delta = torch.empty_like(lse)
    meta = {"D": D, "F64": f64}
    grid = (triton.cdiv(Sq, config["BLOCK_M_DQ"]), B * H)
    _attn_bwd_preprocess_kernel[grid](
        out, dout, dlse if dlse is not None else lse, delta, Sq, H,
        BLOCK_M=config["BLOCK_M_DQ"], HAS_DLSE=dlse is not None, **meta,
    )  # fmt: skip
    ds, de = docs if docs is not None else (k, k)  # never read without HAS_DOC
    scalars = (Sq, Sk, H, Hkv, q_offset, window or 0, max(chunk_len, 1), scale, scale * LOG2E)
    meta |= {
        "NV": NV, "MODE": mode, "CAUSAL": causal, "WINDOW": window is not None,
        "HAS_DOC": docs is not None, "PREC": dot_precision(qs),
        "num_warps": config.get("num_warps_bwd", config["num_warps"]),
        "num_stages": config.get("num_stages_bwd", config["num_stages"]),
    }  # fmt: skip
    grid_kv = (triton.cdiv(Sk, config["BLOCK_N_KV"]), B * Hkv)
    cs, ce = col_docs if col_docs is not None else (ds, de)
    _attn_bwd_dkdv_kernel[grid_kv](
        qs, k, v, dout, lse, delta, dk, dv, cs, ce, *scalars, qs[0].numel(),
        BLOCK_M=config["BLOCK_M_KV"], BLOCK_N=config["BLOCK_N_KV"], **meta,
    )  # fmt: skip
    _attn_bwd_dq_kernel[grid](
        qs, k, v, dout, lse, delta, dqs, ds, de, *scalars, qs[0].numel(),
        BLOCK_M=config["BLOCK_M_DQ"], BLOCK_N=config["BLOCK_N_DQ"], **meta,
    )  # fmt: skip
    return dqs, dk, dv
