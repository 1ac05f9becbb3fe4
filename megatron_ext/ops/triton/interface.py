"""Autograd Functions and public launchers of the Triton attention kernels.

``triton_attention`` is exact softmax attention returning (out, lse) with the semantics of
``attention_ref`` (causal with ``q_offset``, sliding window, chunked-local, document ids, GQA);
``triton_dca_attention`` is the fused Dual Chunk Attention core: three pre-rotated query copies
against one key tensor K' in a single online softmax (megatron_ext/ops/dual_chunk/README.md,
"Exact forms", form 3). Both are differentiable through out and lse, with the backward of
``attention_bwd.py``.

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check
them). ``triton_attention_supported`` says whether the kernels take a given problem; the
dispatchers (``attention.py``, ``dual_chunk/interface.py``) fall back to torch paths otherwise.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.attention_ref import check_attn_args
from megatron_ext.ops.documents import document_runs
from megatron_ext.ops.triton.attention_bwd import attention_bwd
from megatron_ext.ops.triton.attention_fwd import attention_fwd
from megatron_ext.ops.triton.tiles import kernels_interpreted, triton_available

__all__ = [
    "CPU_BLOCKS",
    "HEAD_DIMS",
    "triton_attention",
    "triton_attention_supported",
    "triton_dca_attention",
]

HEAD_DIMS = (16, 32, 64, 128, 256)
"""Head dims the kernels take (tl.dot needs >= 16; tiles hold the whole head dim)."""

CPU_BLOCKS: tuple[int, int] = (16, 16)
"""(BLOCK_M, BLOCK_N) of every kernel on CPU (the interpreter): small, so tiny test shapes
already cross several tiles and ragged edges. Tests may change it."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Tile sizes per (head dim, 16-bit or not): fwd (BLOCK_M x BLOCK_N), dq (BLOCK_M_DQ x BLOCK_N_DQ),
# dk/dv (BLOCK_M_KV query rows x BLOCK_N_KV keys), warps, pipeline stages. Chosen so that the
# sm_90 builds of the plain and DCA kernels compile without register spills (ptxas resource
# usage of an ahead-of-time compile); speed is not tuned yet (see README.md).
_GPU_CONFIGS = {
    # D <= 32: 4 warps; D <= 64 and 128: 8 warps; 256: small tiles.
    (32, True): (128, 64, 64, 64, 32, 128, 4, 3),
    (64, True): (128, 64, 128, 64, 32, 128, 8, 3),
    # D = 128 from the H200 sweep in docs/benchmarks.md (tune_triton): forward 128 x 128
    # tiles (+16% over 128 x 64), backward dq 128 x 64 and dk/dv 64 x 128, 2 stages (+12%).
    (128, True): (128, 128, 128, 64, 64, 128, 8, 3, 8, 2),
    (256, True): (64, 32, 64, 16, 16, 32, 8, 2),
    # fp32 / fp64 (no tensor-core dot): small tiles; D >= 128 still spills (opt-in path only).
    (32, False): (32, 32, 32, 32, 16, 32, 4, 2),
    (64, False): (32, 32, 32, 32, 16, 32, 4, 2),
    (128, False): (32, 32, 32, 32, 16, 16, 4, 2),
    (256, False): (16, 16, 16, 16, 16, 16, 4, 1),
}
_CONFIG_KEYS = (
    "BLOCK_M", "BLOCK_N", "BLOCK_M_DQ", "BLOCK_N_DQ", "BLOCK_M_KV", "BLOCK_N_KV", "num_warps",
    "num_stages", "num_warps_bwd", "num_stages_bwd",
)  # fmt: skip
"""A configuration tuple may stop after ``num_stages``: the backward then uses the forward's."""


def _gpu_config(q: torch.Tensor) -> dict:
    """The GPU tile configuration for inputs like q (any device; read by the resource check)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    return dict(zip(_CONFIG_KEYS, _GPU_CONFIGS[(max(32, q.shape[-1]), half)]))


def _config(q: torch.Tensor) -> dict:
    """Tile sizes: ``CPU_BLOCKS`` everywhere on CPU (the interpreter); ``_GPU_CONFIGS`` on GPU."""
    if q.device.type == "cuda":
        return _gpu_config(q)
    bm, bn = CPU_BLOCKS
    return dict(zip(_CONFIG_KEYS, (bm, bn, bm, bn, bm, bn, 4, 1)))


def _doc_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) index of each index's document: two int32 [B, S] tensors."""
    B, S = doc_ids.shape
    _, pos = document_runs(doc_ids)
    idx = torch.arange(S, device=doc_ids.device).expand(B, S)
    start = idx - pos
    last = torch.ones(B, S, dtype=torch.bool, device=doc_ids.device)
    last[:, :-1] = doc_ids[:, 1:] != doc_ids[:, :-1]
    end = torch.where(last, idx + 1, torch.full_like(idx, S)).flip(1).cummin(1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def triton_attention_supported(
    q: torch.Tensor,
    *,
    window: int | None = None,
    chunk: int | None = None,
    doc_ids: torch.Tensor | None = None,
) -> bool:
    """Whether ``triton_attention`` takes these inputs on q's device.

    Needs triton, a CUDA tensor (or a CPU tensor when the kernels are interpreted), a head dim
    in ``HEAD_DIMS``, and ``chunk`` only without window and doc_ids.
    """
    if not triton_available() or q.shape[-1] not in HEAD_DIMS or q.dtype not in _DTYPES:
        return False
    if q.device.type != "cuda" and not kernels_interpreted():
        return False
    return chunk is None or (window is None and doc_ids is None)


def _check_kernel_inputs(q: torch.Tensor) -> None:
    if not triton_available():
        raise ValueError("triton is not installed; the Triton attention kernels are unavailable")
    if q.device.type != "cuda" and not kernels_interpreted():
        raise ValueError(
            f"q.device={q.device}; the Triton kernels need CUDA tensors, or the Triton "
            "interpreter for CPU tensors (TRITON_INTERPRET=1 set before triton is imported)"
        )
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim D={q.shape[-1]}; the Triton kernels take D in {HEAD_DIMS}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype={q.dtype}; the Triton kernels take {_DTYPES}")


class _TritonAttnFunc(torch.autograd.Function):
    """(qs [NV, B, Sq, H, D], k, v) -> (out, lse); backward exact through both outputs."""

    @staticmethod
    def forward(ctx, qs, k, v, opts):
        qs, k, v = qs.contiguous(), k.contiguous(), v.contiguous()
        config = _config(qs)
        out, lse = attention_fwd(qs, k, v, **opts, config=config)
        ctx.save_for_backward(qs, k, v, out, lse)
        ctx.opts, ctx.config = opts, config
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qs, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        if dlse is not None:
            dlse = dlse.contiguous()
        dqs, dk, dv = attention_bwd(qs, k, v, out, lse, dout, dlse, **ctx.opts, config=ctx.config)
        return dqs, dk, dv, None


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    softmax_scale: float | None = None,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention in Triton; same semantics as ``attention_ref``.

    Query row r has absolute position ``q_offset + r`` among keys ``0..Sk-1``; with causal=True
    it sees keys ``j <= q_offset + r`` (bottom-right aligned when ``q_offset = Sk - Sq``).

    Args:
        q: [B, Sq, H, D], D in ``HEAD_DIMS``; fp16, bf16, fp32 or fp64.
        k, v: [B, Sk, Hkv, D], H % Hkv == 0 (query head h reads KV head h // (H // Hkv)).
        causal: causal mask.
        window: sliding window W (keys ``i-W < j <= i``); needs causal.
        chunk: chunked-local size c (keys of the query's chunk up to itself); needs causal and
            no window / doc_ids on this path.
        softmax_scale: default 1/sqrt(D).
        q_offset: absolute position of query row 0.
        doc_ids: int [B, Sk]; documents are maximal runs of equal ids.

    Returns:
        out [B, Sq, H, D] in q.dtype; lse [B, H, Sq] fp32 (fp64 for fp64 inputs), natural log,
        -inf (and out 0) on rows with no visible key. Differentiable w.r.t. q, k, v through both.
    """
    scale = check_attn_args(
        q, k, v, causal=causal, window=window, chunk=chunk, softmax_scale=softmax_scale,
        q_offset=q_offset, doc_ids=doc_ids,
    )  # fmt: skip
    _check_kernel_inputs(q)
    if chunk is not None and (window is not None or doc_ids is not None):
        raise ValueError(
            f"chunk={chunk} with window={window}, doc_ids={'set' if doc_ids is not None else None}"
            "; the Triton path takes chunk alone (use attention_func for the combination)"
        )
    opts = {
        "scale": scale, "q_offset": q_offset, "mode": int(chunk is not None), "causal": causal,
        "window": window, "chunk_len": chunk or 1,
        "docs": None if doc_ids is None else _doc_bounds(doc_ids.to(q.device)),
    }  # fmt: skip
    return _TritonAttnFunc.apply(q.unsqueeze(0), k, v, opts)  # a view: no copy


def triton_dca_attention(
    q_intra: torch.Tensor,
    q_succ: torch.Tensor,
    q_inter: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_len: int,
    softmax_scale: float,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Dual Chunk Attention core: one launch, one online softmax, three query variants.

    For query position i = q_offset + r and key j <= i with ``delta = i // C - j // C``, the
    logit is ``softmax_scale * <q_X[r], k_rot[j]>`` with X = intra (delta 0), succ (delta 1) or
    inter (delta >= 2). Gradients flow back to each query copy separately, so callers that
    produced the copies by differentiable rotations (``dca_rotate_queries``) get the exact dq.

    Args:
        q_intra, q_succ, q_inter: [B, Sq, H, D] queries rotated at ``i mod C``,
            ``min(C + i mod C, M)`` and ``P_inter`` (temperature folded in or not).
        k_rot: [B, Sk, Hkv, D] keys rotated at ``j mod C``; v: [B, Sk, Hkv, D].
        chunk_len: C >= 1.
        softmax_scale: logit multiplier (1/sqrt(D) times T² with a temperature).
        q_offset: position of query row 0; ``q_offset + Sq <= Sk``.

    Returns:
        out [B, Sq, H, D] in q's dtype; lse [B, H, Sq] fp32 (fp64 for fp64 inputs).
    """
    check_attn_args(
        q_intra, k_rot, v, causal=True, window=None, chunk=None, softmax_scale=softmax_scale,
        q_offset=q_offset, doc_ids=None,
    )  # fmt: skip
    _check_kernel_inputs(q_intra)
    for name, x in (("q_succ", q_succ), ("q_inter", q_inter)):
        if x.shape != q_intra.shape or x.dtype != q_intra.dtype:
            raise ValueError(
                f"{name} shape={tuple(x.shape)} dtype={x.dtype}; expected q_intra's "
                f"{tuple(q_intra.shape)} {q_intra.dtype}"
            )
    if not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len={chunk_len!r}; expected an int >= 1")
    opts = {
        "scale": float(softmax_scale), "q_offset": q_offset, "mode": 1, "causal": True,
        "window": None, "chunk_len": chunk_len, "docs": None,
    }  # fmt: skip
    qs = torch.stack((q_intra, q_succ, q_inter))  # O(S) copy; dq splits back through stack
    return _TritonAttnFunc.apply(qs, k_rot, v, opts)
