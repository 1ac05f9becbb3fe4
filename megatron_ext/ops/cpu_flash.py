"""Tile kernel on the fused ATen CPU flash-attention op (the kernel behind CPU SDPA).

``aten._scaled_dot_product_flash_attention_for_cpu`` returns (out, lse) for q/k/v in
[B, H, S, D] (fp32, fp64, bf16, fp16; GQA supported natively; the causal mask is *top-left*
aligned; an optional additive float mask). The blockwise planner only hands it pieces it can
do exactly: ``full`` (no mask), ``causal`` (a square diagonal, top-left = our alignment) and
``masked`` (additive 0 / -inf tile).

Two fix-ups make it exact for our conventions:

- a row with no visible key in a masked tile comes back with lse = 0; we set it to -inf;
- the ATen backward computes ``D_i = rowsum(dO_i * O_i)`` and has no lse gradient. When lse has
  a gradient we append one extra head-dim column: q and k get 0 (logits unchanged, the scale is
  passed explicitly), v gets 0, dO gets 1 and O gets -dlse. Then the kernel's
  ``dP = dO V^T`` is unchanged and its ``D`` becomes ``rowsum(dO * O) - dlse``, which is exactly
  the D of docs/methods/conventions.md, "Attention backward"; the extra output columns are dropped.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.blockwise import Piece

__all__ = ["FusedCPUTiles", "fused_cpu_available", "lse_grad_columns"]

_HALF = (torch.bfloat16, torch.float16)


def fused_cpu_available() -> bool:
    """Whether this torch build has the fused CPU flash-attention ops."""
    ops = torch.ops.aten
    return hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        ops, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [Bp, bq, bk] -> additive float mask [Bp, 1, bq, bk] (0 visible, -inf hidden)."""
    zero = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zero.masked_fill_(~mask, float("-inf")).unsqueeze(1)


def lse_grad_columns(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
    dlse: torch.Tensor, *, width: int,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Append ``width`` head-dim columns that carry a gradient into lse through an attention
    backward computing ``D = rowsum(dO * O)``: zeros in q, k and v (logits unchanged, the scale
    is passed explicitly), ``-dlse`` in O's first new column against a 1 in dO's, zeros
    elsewhere. The backward's gradients then have ``width`` extra columns to drop.

    Args:
        q, o, do: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D]; dlse: [B, H, Sq].
        width: columns to append (kernels that want head dims in multiples of 8 take 8).
    """
    zq = q.new_zeros(1).expand(*q.shape[:-1], width)
    zk = k.new_zeros(1).expand(*k.shape[:-1], width)
    extra = o.new_zeros(*o.shape[:-1], width)
    extra[..., 0] = -dlse.to(o.dtype)
    one = torch.zeros_like(extra)
    one[..., 0] = 1
    return (torch.cat((q, zq), -1), torch.cat((k, zk), -1), torch.cat((v, zk), -1),
            torch.cat((o, extra), -1), torch.cat((do, one), -1))  # fmt: skip


class FusedCPUTiles:
    """Fused CPU tile kernel; same interface as ``blockwise.TorchTiles``.

    Args:
        q: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D] (views).
        scale: softmax scale.
        upcast: compute half-precision inputs in fp32 (needed when a block has several pieces,
            so partial outputs are merged in fp32).
    """

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, upcast: bool
    ) -> None:
        self.in_dtype = q.dtype
        if upcast and q.dtype in _HALF:
            q, k, v = q.float(), k.float(), v.float()
        self.q, self.k, self.v, self.scale = q, k, v, scale

    def fwd(self, bsel, r0: int, r1: int, piece: Piece, mask: torch.Tensor | None):
        q = self.q[bsel, :, r0:r1]
        k, v = self.k[bsel, :, piece.k0 : piece.k1], self.v[bsel, :, piece.k0 : piece.k1]
        am = None if mask is None else _additive(mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p=0.0, is_causal=piece.kind == "causal", attn_mask=am, scale=self.scale
        )
        if mask is not None:  # the op reports lse = 0 for rows with no visible key
            lse = lse.masked_fill(~mask.any(-1).unsqueeze(1), float("-inf"))
        return out, lse

    def set_grads(
        self, do: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None
    ) -> None:
        """Store backward inputs: do, o [B, H, Sq, D]; lse, dlse [B, H, Sq] (dlse may be None)."""
        q, k, v = self.q, self.k, self.v
        if dlse is not None and q.dtype in _HALF:  # -dlse must not be rounded to half
            q, k, v = q.float(), k.float(), v.float()
        do, o = do.to(q.dtype), o.to(q.dtype)
        ldt = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(ldt)
        self.pad = dlse is not None
        if self.pad:
            q, k, v, o, do = lse_grad_columns(q, k, v, o, do, dlse, width=1)
        self.gq, self.gk, self.gv, self.do, self.o = q, k, v, do, o

    def bwd(self, bsel, r0: int, r1: int, piece: Piece, mask: torch.Tensor | None):
        q = self.gq[bsel, :, r0:r1]
        k, v = self.gk[bsel, :, piece.k0 : piece.k1], self.gv[bsel, :, piece.k0 : piece.k1]
        am = None if mask is None else _additive(mask, q.dtype)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            self.do[bsel, :, r0:r1], q, k, v, self.o[bsel, :, r0:r1],
            self.lse[bsel, :, r0:r1], 0.0, piece.kind == "causal", attn_mask=am, scale=self.scale,
        )  # fmt: skip
        if self.pad:
            dq, dk, dv = dq[..., :-1], dk[..., :-1], dv[..., :-1]
        return dq, dk, dv
