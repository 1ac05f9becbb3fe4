"""Triton flash-attention backward: exact dq (per query variant), dk and dv, no atomics.

Maths (../shared/METHODS.md §0): with P = exp(z - lse) recomputed from the saved lse,

    D_i = rowsum(dO_i * O_i) - dlse_i                  (``_attn_bwd_preprocess_kernel``)
    dV  = P^T dO,  dZ = P * (dO V^T - D),  dK = scale dZ^T Q   (``_attn_bwd_dkdv_kernel``)
    dQ  = scale dZ K                                    (``_attn_bwd_dq_kernel``)

The dlse term makes gradients exact also when lse is used downstream (partial results merged by
autograd, DCA passes, context parallelism).

- dk/dv: one program per (key tile, KV head) loops over the ``H / Hkv`` query heads of its group
  and over the query tiles that see the key tile, accumulating in fp32 registers; each dk/dv
  element is written once by one program.
- dq: one program per (query tile, query head) walks the key tiles like the forward. With DCA's
  three query variants it keeps one accumulator per variant and writes dq_intra, dq_succ and
  dq_inter separately (each pair (i, j) contributes to exactly one of them), so the caller's
  autograd rotates each back with its own RoPE.

Rows with lse = -inf (nothing visible) are read as lse = +inf, which makes their P exactly 0;
query rows past Sq load lse = +inf and dO = 0 for the same reason.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.triton.tiles import dot_precision, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from megatron_ext.ops.triton.tiles import dot, key_range, query_range, split_range, visible

__all__ = ["attention_bwd"]

LOG2E = 1.4426950408889634

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
        dk, dv, k, v, Q, DO, LSE, DELTA, q_base, q_row, l_base, start, end, j_abs, q_offset,
        Sq, Sk, window, chunk_len, qk_scale, ds_j, DS,
        MASKED: tl.constexpr, VARIANT: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        for start_m in range(start, end, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < Sq
            qt_ptr = q_base + rows.to(tl.int64)[None, :] * q_row + offs_d[:, None]  # [D, BLOCK_M]
            qt = tl.load(Q + qt_ptr, mask=row_ok[None, :], other=0.0)
            lse = tl.load(LSE + l_base + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            st = dot(k, qt, dk.dtype, PREC) * qk_scale
            pt = tl.exp2(st - lse[None, :])  # [BLOCK_N, BLOCK_M]
            if MASKED:
                i_abs = q_offset + rows
                ds_i = ds_j
                if HAS_DOC:
                    ds_i = tl.load(DS + i_abs, mask=row_ok, other=-2)[None, :]
                vis = visible(
                    i_abs[None, :], j_abs[:, None], q_offset + Sq, Sk, window, chunk_len, ds_i,
                    ds_j, VARIANT, MODE, CAUSAL, WINDOW, HAS_DOC,
                )  # fmt: skip
                pt = tl.where(vis, pt, 0.0)
            do = tl.load(
                DO + q_base + rows.to(tl.int64)[:, None] * q_row + offs_d[None, :],
                mask=row_ok[:, None], other=0.0,
            )  # fmt: skip
            dv += dot(pt.to(do.dtype), do, dv.dtype, PREC)
            delta = tl.load(DELTA + l_base + rows, mask=row_ok, other=0.0)
            dpt = dot(v, tl.trans(do), dk.dtype, PREC)
            dst = pt * (dpt - delta[None, :])
            dk += dot(dst.to(qt.dtype), tl.trans(qt), dk.dtype, PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q0, Q1, Q2, K, V, DO, LSE, DELTA, DK, DV, DOCS, DOCE,
        Sq, Sk, H, HKV, q_offset, window, chunk_len, scale, qk_scale,
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
        offs_d = tl.arange(0, D)
        col_ok = j_abs < Sk
        kv_ptr = (((b * Sk + j_abs).to(tl.int64) * HKV + g) * D)[:, None] + offs_d[None, :]
        k = tl.load(K + kv_ptr, mask=col_ok[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(V + kv_ptr, mask=col_ok[:, None], other=0.0)
        j1 = tl.minimum(j0 + BLOCK_N, Sk) - 1
        DS = DOCS + b.to(tl.int64) * Sk
        DE = DOCE + b.to(tl.int64) * Sk
        ds_j = j_abs[:, None]
        if HAS_DOC:
            ds_j = tl.load(DS + j_abs, mask=col_ok, other=-1)[:, None]
        acc_t = tl.float64 if F64 else tl.float32
        dk = tl.zeros([BLOCK_N, D], dtype=acc_t)
        dv = tl.zeros([BLOCK_N, D], dtype=acc_t)
        q_row = H * D
        for hq in range(0, n_rep):
            h = g * n_rep + hq
            q_base = b.to(tl.int64) * Sq * q_row + h * D
            l_base = (b * H + h).to(tl.int64) * Sq
            for var in tl.static_range(NV):
                lo, hi, flo, fhi = query_range(
                    j0, j1, q_offset, Sq, window, chunk_len, DS, DE, var, MODE, CAUSAL, WINDOW,
                    HAS_DOC,
                )  # fmt: skip
                start, l1, l2 = split_range(lo, hi, flo, fhi, BLOCK_M)
                fixed = (LSE, DELTA, q_base, q_row, l_base)
                rest = (j_abs, q_offset, Sq, Sk, window, chunk_len, qk_scale, ds_j, DS)
                flags = (var, MODE, CAUSAL, WINDOW, HAS_DOC, BLOCK_M, D, PREC)
                if var == 0:
                    qd = (Q0, DO, *fixed)
                elif var == 1:
                    qd = (Q1, DO, *fixed)
                else:
                    qd = (Q2, DO, *fixed)
                dk, dv = _dkdv_tiles(dk, dv, k, v, *qd, start, l1, *rest, True, *flags)
                dk, dv = _dkdv_tiles(dk, dv, k, v, *qd, l1, l2, *rest, False, *flags)
                dk, dv = _dkdv_tiles(dk, dv, k, v, *qd, l2, hi, *rest, True, *flags)
        tl.store(DK + kv_ptr, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + kv_ptr, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])

    @triton.jit
    def _dq_tiles(
        dq, q, do, lse, delta, K, V, kv_row, kv_base, start, end, i_abs, q_end, Sk, window,
        chunk_len, qk_scale, ds_i, DS,
        MASKED: tl.constexpr, VARIANT: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + offs_n
            ptr = kv_base + cols.to(tl.int64)[None, :] * kv_row + offs_d[:, None]  # [D, BLOCK_N]
            kt = tl.load(K + ptr, mask=(cols < Sk)[None, :], other=0.0)
            vt = tl.load(V + ptr, mask=(cols < Sk)[None, :], other=0.0)
            s = dot(q, kt, dq.dtype, PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            if MASKED:
                ds_j = ds_i
                if HAS_DOC:
                    ds_j = tl.load(DS + cols, mask=cols < Sk, other=-1)[None, :]
                vis = visible(
                    i_abs[:, None], cols[None, :], q_end, Sk, window, chunk_len, ds_i, ds_j,
                    VARIANT, MODE, CAUSAL, WINDOW, HAS_DOC,
                )  # fmt: skip
                p = tl.where(vis, p, 0.0)
            dp = dot(do, vt, dq.dtype, PREC)
            ds = p * (dp - delta[:, None])
            dq += dot(ds.to(kt.dtype), tl.trans(kt), dq.dtype, PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q0, Q1, Q2, K, V, DO, LSE, DELTA, DQ0, DQ1, DQ2, DOCS, DOCE,
        Sq, Sk, H, HKV, q_offset, window, chunk_len, scale, qk_scale,
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
        offs_d = tl.arange(0, D)
        row_ok = rows < Sq
        q_ptr = (((b * Sq + rows).to(tl.int64) * H + h) * D)[:, None] + offs_d[None, :]
        kv_row = HKV * D
        kv_base = b.to(tl.int64) * Sk * kv_row + g * D
        l_ptr = (b * H + h).to(tl.int64) * Sq + rows
        do = tl.load(DO + q_ptr, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + l_ptr, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + l_ptr, mask=row_ok, other=0.0)
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
            dq = tl.zeros([BLOCK_M, D], dtype=acc_t)
            args = (q, do, lse, delta, K, V, kv_row, kv_base)
            rest = (i_abs, q_end, Sk, window, chunk_len, qk_scale, ds_i, DS)
            flags = (var, MODE, CAUSAL, WINDOW, HAS_DOC, BLOCK_N, D, PREC)
            dq = _dq_tiles(dq, *args, start, l1, *rest, True, *flags)
            dq = _dq_tiles(dq, *args, l1, l2, *rest, False, *flags)
            dq = _dq_tiles(dq, *args, l2, hi, *rest, True, *flags)
            if var == 0:
                tl.store(DQ0 + q_ptr, (dq * scale).to(DQ0.dtype.element_ty), mask=row_ok[:, None])
            elif var == 1:
                tl.store(DQ1 + q_ptr, (dq * scale).to(DQ1.dtype.element_ty), mask=row_ok[:, None])
            else:
                tl.store(DQ2 + q_ptr, (dq * scale).to(DQ2.dtype.element_ty), mask=row_ok[:, None])


def attention_bwd(
    qs: tuple[torch.Tensor, ...],
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
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Launch the backward kernels on contiguous tensors (arguments as ``attention_fwd``).

    Args:
        out, lse: the forward's outputs; dout: [B, Sq, H, D]; dlse: [B, H, Sq] or None.
        config: BLOCK_M / BLOCK_N of the dq kernel, BLOCK_M_KV / BLOCK_N_KV of the dk/dv
            kernel, num_warps, num_stages.

    Returns:
        (dqs, dk, dv): one dq per query tensor in ``qs`` (same shapes and dtypes), dk and dv
        in k's dtype.
    """
    q0 = qs[0]
    B, Sq, H, D = q0.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    f64 = q0.dtype == torch.float64
    dqs = tuple(torch.empty_like(q) for q in qs)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if Sq == 0 or B * H == 0 or Sk == 0:
        for t in (*dqs, dk, dv):
            t.zero_()
        return dqs, dk, dv
    delta = torch.empty_like(lse)
    meta = {"D": D, "F64": f64}
    grid = (triton.cdiv(Sq, config["BLOCK_M"]), B * H)
    _attn_bwd_preprocess_kernel[grid](
        out, dout, dlse if dlse is not None else lse, delta, Sq, H,
        BLOCK_M=config["BLOCK_M"], HAS_DLSE=dlse is not None, **meta,
    )  # fmt: skip
    q1, q2 = (qs[1], qs[2]) if len(qs) == 3 else (q0, q0)
    dq1, dq2 = (dqs[1], dqs[2]) if len(qs) == 3 else (dqs[0], dqs[0])
    ds, de = docs if docs is not None else (k, k)  # never read without HAS_DOC
    scalars = (Sq, Sk, H, Hkv, q_offset, window or 0, max(chunk_len, 1), scale, scale * LOG2E)
    meta |= {
        "NV": len(qs), "MODE": mode, "CAUSAL": causal, "WINDOW": window is not None,
        "HAS_DOC": docs is not None,
        "PREC": dot_precision(q0),
        "num_warps": config["num_warps"], "num_stages": config["num_stages"],
    }  # fmt: skip
    grid_kv = (triton.cdiv(Sk, config["BLOCK_N_KV"]), B * Hkv)
    _attn_bwd_dkdv_kernel[grid_kv](
        q0, q1, q2, k, v, dout, lse, delta, dk, dv, ds, de, *scalars,
        BLOCK_M=config["BLOCK_M_KV"], BLOCK_N=config["BLOCK_N_KV"], **meta,
    )  # fmt: skip
    _attn_bwd_dq_kernel[grid](
        q0, q1, q2, k, v, dout, lse, delta, dqs[0], dq1, dq2, ds, de, *scalars,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], **meta,
    )  # fmt: skip
    return dqs, dk, dv
