"""``attention_func``: memory-efficient exact attention returning (out, lse), exact backward.

Same signature and semantics as ``attention_ref`` (masks, q_offset, doc_ids, GQA; see
docs/methods/conventions.md), but O(S) memory: a custom autograd Function runs the blockwise
online-softmax engine of ``blockwise.py`` forward and recomputes tiles in backward. The backward
is exact also for gradients flowing into ``lse`` (``D_i = rowsum(dO * O) - dlse_i``), so partial
results can be merged by autograd (``merge_attn_outputs``).

Backends (``backend=`` keyword; ``"auto"`` picks):

=================  =====================================================================
cpu_fused          plain causal / full (any q_offset) on CPU: the fused ATen CPU kernel on
                   the whole problem ([0, q_offset) full + diagonal causal, merged by lse)
cpu_blockwise      window / chunk / doc_ids on CPU: the planner's pieces on the fused kernel
torch_blockwise    any device and dtype: the planner's pieces in plain torch (fp32 / fp64)
flash_attn         CUDA with flash-attn importable, fp16/bf16, no chunk / doc_ids: flash-attn
                   forward; flash-attn backward unless lse has a gradient (then blockwise)
triton             CUDA fp16/bf16 where flash_attn is absent or does not apply (doc_ids, or
                   chunk without window / doc_ids), head dim 16..256: ``ops/triton``
=================  =====================================================================

``"auto"`` asks ``backend.resolve_backend`` (the one dispatch module, with its override).
"""

from __future__ import annotations

import torch

from megatron_ext.ops import blockwise
from megatron_ext.ops.attention_ref import check_attn_args
from megatron_ext.ops.backend import resolve_backend
from megatron_ext.ops.cpu_flash import FusedCPUTiles, fused_cpu_available
from megatron_ext.ops.triton import triton_attention, triton_attention_supported

__all__ = ["BACKENDS", "attention_func", "mask_kind"]

BACKENDS = ("auto", "cpu_fused", "cpu_blockwise", "torch_blockwise", "flash_attn", "triton", "sdpa")

BLOCK_Q = {"cpu_blockwise": 256, "torch_blockwise": 128}
BLOCK_K = {"cpu_blockwise": 512, "torch_blockwise": 512}


def _load_flash_attn():
    """flash_attn_func, or None when flash-attn is not installed (imported lazily)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def mask_kind(
    causal: bool, window: int | None, chunk: int | None, doc_ids: torch.Tensor | None
) -> str:
    """The ``backend.MASKS`` kind of these mask arguments."""
    if chunk is not None:
        return "chunk"
    if doc_ids is not None:
        return "documents"
    if window is not None:
        return "window"
    return "causal" if causal else "full"


def _block_q(backend: str, window: int | None) -> int:
    # A block no taller than the window keeps the diagonal piece exactly causal (see blockwise).
    return BLOCK_Q[backend] if window is None else min(BLOCK_Q[backend], max(window, 64))


def _kernel(backend: str, q, k, v, scale: float, plan: list[blockwise.Block]):
    if backend == "torch_blockwise":
        return blockwise.TorchTiles(q, k, v, scale)
    single = len(plan) == 1 and len(plan[0].pieces) == 1
    return FusedCPUTiles(q, k, v, scale, upcast=not single)


def _whole_piece(plan: list[blockwise.Block], sq: int) -> blockwise.Piece | None:
    """The piece, when one piece covers every query row (then no merge and no extra copies)."""
    whole = len(plan) == 1 and plan[0].b is None and (plan[0].r0, plan[0].r1) == (0, sq)
    return plan[0].pieces[0] if whole and len(plan[0].pieces) == 1 else None


class _BlockwiseAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lo, hi, plan, backend, scale):
        B, Sq, H, D = q.shape
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ldt = torch.float64 if q.dtype == torch.float64 else torch.float32
        kern = _kernel(backend, qt, kt, vt, scale, plan)
        piece = _whole_piece(plan, Sq)
        if piece is not None:
            mask = blockwise.piece_mask(lo, hi, plan[0], piece, q.device)
            o, lse = kern.fwd(slice(None), 0, Sq, piece, mask)
            out, lse = o.to(q.dtype).transpose(1, 2), lse.to(ldt)
        else:
            out = torch.zeros(B, Sq, H, D, dtype=q.dtype, device=q.device)
            lse = torch.full((B, H, Sq), float("-inf"), dtype=ldt, device=q.device)
            blockwise.run_forward(kern, plan, lo, hi, out.transpose(1, 2), lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.lo, ctx.hi, ctx.backend, ctx.scale = plan, lo, hi, backend, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*_blockwise_backward(ctx, q, k, v, out, lse, dout, dlse), *([None] * 5))


def _blockwise_backward(ctx, q, k, v, out, lse, dout, dlse):
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is not None and not bool(dlse.ne(0).any()):
        dlse = None
    gdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kern = _kernel(ctx.backend, qt, kt, vt, ctx.scale, ctx.plan)
    kern.set_grads(dout.transpose(1, 2), out.transpose(1, 2), lse, dlse)
    piece = _whole_piece(ctx.plan, q.shape[1])
    if piece is not None and (piece.k0, piece.k1) == (0, k.shape[1]):
        mask = blockwise.piece_mask(ctx.lo, ctx.hi, ctx.plan[0], piece, q.device)
        dq, dk, dv = kern.bwd(slice(None), 0, q.shape[1], piece, mask)
    else:
        dq = torch.zeros(qt.shape, dtype=gdt, device=q.device)
        dk = torch.zeros(kt.shape, dtype=gdt, device=q.device)
        dv = torch.zeros(vt.shape, dtype=gdt, device=q.device)
        blockwise.run_backward(kern, ctx.plan, ctx.lo, ctx.hi, dq, dk, dv)
    return (
        dq.transpose(1, 2).to(q.dtype),
        dk.transpose(1, 2).to(k.dtype),
        dv.transpose(1, 2).to(v.dtype),
    )


class _FlashAttnFunc(torch.autograd.Function):
    """flash-attn forward; its own backward unless lse has a gradient (then blockwise torch)."""

    @staticmethod
    def forward(ctx, q, k, v, flash_fn, causal, window, scale, q_offset):
        sk = q_offset + q.shape[1] if causal else k.shape[1]  # flash aligns causal bottom-right
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k[:, :sk], v[:, :sk])]
            out, lse, _ = flash_fn(
                *leaves, dropout_p=0.0, softmax_scale=scale, causal=causal,
                window_size=(-1, -1) if window is None else (window - 1, 0),
                return_attn_probs=True,
            )  # fmt: skip
        ctx.inner, ctx.sk, ctx.scale = (out, leaves), sk, scale
        lo, hi = blockwise.visible_ranges(
            q.shape[0], q.shape[1], k.shape[1], causal=causal, window=window, chunk=None,
            q_offset=q_offset, doc_ids=None,
        )  # fmt: skip
        ctx.lo, ctx.hi, ctx.backend = lo, hi, "torch_blockwise"
        ctx.plan = blockwise.plan_blocks(
            lo, hi, causal=causal, q_offset=q_offset, block_q=BLOCK_Q["torch_blockwise"],
            block_k=BLOCK_K["torch_blockwise"], split_full=True,
        )  # fmt: skip
        ctx.k_len = k.shape[1]
        ctx.save_for_backward(q, k, v)
        ctx.set_materialize_grads(False)
        out_d, lse_d = out.detach(), lse.detach()
        ctx.out_lse = (out_d, lse_d)
        return out_d.clone(), lse_d.clone()

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v = ctx.saved_tensors
        out, lse = ctx.out_lse
        none = [None] * 5
        if dlse is None or not bool(dlse.ne(0).any()):
            if dout is None:
                return None, None, None, *none
            inner_out, leaves = ctx.inner
            dq, dk, dv = torch.autograd.grad(inner_out, leaves, dout)
            pad = [0, 0, 0, 0, 0, ctx.k_len - ctx.sk]
            return dq, torch.nn.functional.pad(dk, pad), torch.nn.functional.pad(dv, pad), *none
        return (*_blockwise_backward(ctx, q, k, v, out, lse, dout, dlse), *none)


def _sdpa(q, k, v, *, causal: bool, scale: float, top_left: bool, need_lse: bool, plain: bool):
    """PyTorch SDPA (cuDNN / flash / efficient on CUDA; math on CPU): out only, GQA native."""
    if need_lse or not plain or not top_left:
        raise ValueError(
            "backend='sdpa' returns no lse and takes plain causal (Sq == Sk, q_offset 0) or full "
            f"attention only (need_lse={need_lse}, plain mask={plain}, top-left={top_left})"
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2), None


def attention_func(
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
    backend: str = "auto",
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Memory-efficient exact attention; same semantics as ``attention_ref``.

    Query row r has absolute position ``q_offset + r`` among keys ``0..Sk-1``; with causal=True
    it sees keys ``j <= q_offset + r`` (bottom-right aligned when ``q_offset = Sk - Sq``).

    Args:
        q: [B, Sq, H, D].
        k, v: [B, Sk, Hkv, D], H % Hkv == 0 (query head h reads KV head h // (H // Hkv)).
        causal: causal mask.
        window: sliding window W (keys ``i-W < j <= i``); needs causal.
        chunk: chunked-local size c; needs causal; per-document positions with doc_ids.
        softmax_scale: default 1/sqrt(D).
        q_offset: absolute position of query row 0 (>= 0; ``q_offset + Sq <= Sk`` when causal
            or with doc_ids).
        doc_ids: int [B, Sk]; documents are maximal runs of equal ids.
        backend: "auto" or one of BACKENDS (see module docstring).
        need_lse: False when the caller ignores the lse: plain causal (Sq == Sk, q_offset 0) or
            full attention may then run on PyTorch's SDPA (cuDNN / flash), which returns none.

    Returns:
        out [B, Sq, H, D] in q.dtype; lse [B, H, Sq] fp32 (fp64 for fp64 inputs), -inf (and
        out 0) on rows with no visible key, or None on the "sdpa" backend. Differentiable
        w.r.t. q, k, v through both outputs.
    """
    scale = check_attn_args(
        q, k, v, causal=causal, window=window, chunk=chunk, softmax_scale=softmax_scale,
        q_offset=q_offset, doc_ids=doc_ids,
    )  # fmt: skip
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    top_left = not causal or (q_offset == 0 and q.shape[1] == k.shape[1])
    if backend == "auto":
        backend = resolve_backend(q, mask_kind(causal, window, chunk, doc_ids),
                                  need_lse=need_lse or not top_left)
    if backend == "sdpa":
        return _sdpa(q, k, v, causal=causal, scale=scale, top_left=top_left, need_lse=need_lse,
                     plain=window is None and chunk is None and doc_ids is None)
    plain = window is None and chunk is None and doc_ids is None
    if backend.startswith("cpu_") and (q.device.type != "cpu" or not fused_cpu_available()):
        raise ValueError(f"backend={backend!r} needs CPU tensors and torch's fused CPU kernel")
    if backend == "cpu_fused" and not plain:
        raise ValueError(
            "backend='cpu_fused' handles plain causal/full masks only; use 'cpu_blockwise' for "
            f"window={window}, chunk={chunk}, doc_ids={'set' if doc_ids is not None else None}"
        )
    if backend == "triton":
        if not triton_attention_supported(q, window=window, chunk=chunk, doc_ids=doc_ids):
            raise ValueError(
                f"backend='triton' needs triton, head dim in (16, 32, 64, 128, 256) (got "
                f"{q.shape[-1]}) and chunk only without window / doc_ids (chunk={chunk})"
            )
        return triton_attention(
            q, k, v, causal=causal, window=window, chunk=chunk, softmax_scale=scale,
            q_offset=q_offset, doc_ids=doc_ids,
        )  # fmt: skip
    if backend == "flash_attn":
        flash_fn = _load_flash_attn()
        if flash_fn is None or chunk is not None or doc_ids is not None:
            raise ValueError(
                "backend='flash_attn' needs flash-attn installed and no chunk / doc_ids "
                f"(chunk={chunk}, doc_ids={'set' if doc_ids is not None else None})"
            )
        return _FlashAttnFunc.apply(q, k, v, flash_fn, causal, window, scale, q_offset)
    B, Sq, _, _ = q.shape
    lo, hi = blockwise.visible_ranges(
        B, Sq, k.shape[1], causal=causal, window=window, chunk=chunk, q_offset=q_offset,
        doc_ids=doc_ids,
    )  # fmt: skip
    whole = backend == "cpu_fused"
    plan = blockwise.plan_blocks(
        lo, hi, causal=causal, q_offset=q_offset,
        block_q=max(Sq, 1) if whole else _block_q(backend, window),
        block_k=BLOCK_K.get(backend, 512), split_full=backend == "torch_blockwise",
    )  # fmt: skip
    return _BlockwiseAttnFunc.apply(q, k, v, lo, hi, plan, backend, scale)
