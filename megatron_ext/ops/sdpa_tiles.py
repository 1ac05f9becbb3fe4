"""Tile kernel on PyTorch's fused CUDA attention kernels (cuDNN or flash), keeping the lse.

The public ``scaled_dot_product_attention`` returns no lse, so it cannot serve partial results
that are merged afterwards (DCA passes, context-parallel blocks). The ATen ops behind it do
return one, and their backward ops take ``out`` and ``lse`` as inputs. That is all the blockwise
engine needs (``blockwise.run_forward`` / ``run_backward``): each *full* or *causal* piece of a
plan is one call of the fused forward, and its backward is the fused backward called with the
*merged* (out, lse) of the whole softmax ("ring style", docs/methods/conventions.md, "Backward of
the merge"), which makes every piece's gradient exact.

Fix-ups, the same ideas as ``cpu_flash.py`` (whose ``lse_grad_columns`` both use):

- ragged *masked* pieces (interval edges that are not a square diagonal) go to the plain torch
  tiles (``blockwise.TorchTiles``); DCA and CP plans have few of them;
- GQA: the fused ops want equal head counts, so a piece's K / V heads are repeated and their
  gradients summed back per group (head ``h`` reads KV head ``h // rep``);
- a gradient into lse (``dlse``): the backward computes ``D_i = rowsum(dO_i * O_i)``; eight zero
  columns are appended to q, k and v (the kernels want head dims in multiples of 8) and the first
  extra column of O carries ``-dlse`` against a 1 in dO, so ``D`` becomes
  ``rowsum(dO * O) - dlse``; the extra gradient columns are dropped.

Engines (``SDPA_ENGINES``): "cudnn" and "flash" are the CUDA ops; "cpu" runs the same contract
on torch's fused CPU ops, so the fix-ups above are tested without a GPU.

Not measured yet: cuDNN builds an execution plan per distinct piece shape and caches it. The
benchmarks reuse shapes (fixed lengths, fixed document layout); training on packed documents
whose boundaries move every batch gives new piece shapes each step, and the cost of those
builds is unknown. Where it shows, ``MEGATRON_EXT_SDPA_ENGINE=flash`` (no per-shape plans;
slower kernels) or forcing the "triton" backend (``backend.py``) are the alternatives.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable

import torch

from megatron_ext.ops.blockwise import Piece, TorchTiles
from megatron_ext.ops.cpu_flash import lse_grad_columns
from megatron_ext.ops.override import forced_choice

__all__ = ["ENGINE_VAR", "SDPA_ENGINES", "SDPATiles", "force_engine", "sdpa_engine"]

SDPA_ENGINES = ("cudnn", "flash", "cpu")
ENGINE_VAR = "MEGATRON_EXT_SDPA_ENGINE"
_PAD = 8
_ops = torch.ops.aten
_cudnn_lse_dims: list[int] = []  # the lse rank cuDNN's forward returned (3 or 4), once known
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("sdpa_engine", default=None)

Fwd = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple]
Bwd = Callable[..., tuple]


def sdpa_engine(device: torch.device) -> str:
    """The engine for tensors on ``device``: on CUDA ``force_engine``'s, else
    ``$MEGATRON_EXT_SDPA_ENGINE``, else "cudnn"; "cpu" on the CPU."""
    if device.type != "cuda":
        return "cpu"
    name = _forced.get() or os.environ.get(ENGINE_VAR, "cudnn")
    if name not in ("cudnn", "flash"):
        raise ValueError(f"{ENGINE_VAR}={name!r}; expected 'cudnn' or 'flash' on CUDA")
    return name


def force_engine(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Plan the block's CUDA interval pieces on engine ``name`` ("cudnn" / "flash"; None: the
    environment's or the default). It wins over ``$MEGATRON_EXT_SDPA_ENGINE``."""
    return forced_choice(_forced, name, ("cudnn", "flash"), "force_engine")


def _cpu_fwd(q, k, v, causal, scale):
    return _ops._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p=0.0, is_causal=causal, scale=scale
    )[:2]


def _cpu_bwd(do, q, k, v, o, lse, causal, scale):
    return _ops._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, o, lse, 0.0, causal, scale=scale
    )


def _flash_fwd(q, k, v, causal, scale):
    r = _ops._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return r[0], r[1]


def _flash_bwd(do, q, k, v, o, lse, causal, scale):
    e = q.new_empty(0, dtype=torch.int64)
    return _ops._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, e, e, scale=scale
    )


def _cudnn_fwd(q, k, v, causal, scale):
    r = _ops._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                 scale=scale)
    if not _cudnn_lse_dims:
        _cudnn_lse_dims.append(r[1].dim())
    return r[0], r[1].reshape(q.shape[:3])


def _cudnn_bwd(do, q, k, v, o, lse, causal, scale):
    if _cudnn_lse_dims and _cudnn_lse_dims[0] == 4:
        lse = lse.unsqueeze(-1)
    e = q.new_empty(0, dtype=torch.int64)
    return _ops._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, o, lse, e, e, None, None, None, q.shape[2], k.shape[2], 0.0, causal,
        scale=scale,
    )  # fmt: skip


_ENGINES: dict[str, tuple[Fwd, Bwd]] = {
    "cpu": (_cpu_fwd, _cpu_bwd),
    "flash": (_flash_fwd, _flash_bwd),
    "cudnn": (_cudnn_fwd, _cudnn_bwd),
}


class SDPATiles:
    """Tile kernel with the interface of ``blockwise.TorchTiles`` on a fused SDPA engine.

    Args:
        q: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D] (views, fp16 / bf16 on CUDA).
        scale: softmax scale.
        engine: one of ``SDPA_ENGINES`` (default: ``sdpa_engine(q.device)``).
    """

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        engine: str | None = None,
    ) -> None:  # fmt: skip
        self.engine = engine or sdpa_engine(q.device)
        if self.engine not in _ENGINES:
            raise ValueError(f"engine={self.engine!r}; expected one of {SDPA_ENGINES}")
        self._fwd, self._bwd = _ENGINES[self.engine]
        self.q, self.k, self.v, self.scale = q, k, v, scale
        self.rep = q.shape[1] // k.shape[1]
        self.edges = TorchTiles(q, k, v, scale)

    def _kv(self, x: torch.Tensor, bsel, piece: Piece) -> torch.Tensor:
        x = x[bsel, :, piece.k0 : piece.k1]
        return x.repeat_interleave(self.rep, dim=1) if self.rep > 1 else x

    def _fold(self, g: torch.Tensor) -> torch.Tensor:
        """[b, H, n, D] gradient of repeated KV heads -> [b, Hkv, n, D]."""
        if self.rep == 1:
            return g
        b, _, n, d = g.shape
        return g.view(b, -1, self.rep, n, d).sum(2)

    def fwd(self, bsel, r0: int, r1: int, piece: Piece, mask: torch.Tensor | None):
        if piece.kind == "masked":
            return self.edges.fwd(bsel, r0, r1, piece, mask)
        q = self.q[bsel, :, r0:r1]
        k, v = self._kv(self.k, bsel, piece), self._kv(self.v, bsel, piece)
        return self._fwd(q, k, v, piece.kind == "causal", self.scale)

    def set_grads(
        self, do: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None
    ) -> None:
        """Store backward inputs: do, o [B, H, Sq, D]; lse, dlse [B, H, Sq] (dlse may be None)."""
        self.edges.set_grads(do, o, lse, dlse)
        q, k, v = self.q, self.k, self.v
        do, o = do.to(q.dtype), o.to(q.dtype)
        self.lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).float()
        self.pad = dlse is not None
        if self.pad:
            q, k, v, o, do = lse_grad_columns(q, k, v, o, do, dlse, width=_PAD)
        self.gq, self.gk, self.gv, self.do, self.o = q, k, v, do, o

    def bwd(self, bsel, r0: int, r1: int, piece: Piece, mask: torch.Tensor | None):
        if piece.kind == "masked":
            return self.edges.bwd(bsel, r0, r1, piece, mask)
        q = self.gq[bsel, :, r0:r1]
        k, v = self._kv(self.gk, bsel, piece), self._kv(self.gv, bsel, piece)
        dq, dk, dv = self._bwd(
            self.do[bsel, :, r0:r1], q, k, v, self.o[bsel, :, r0:r1],
            self.lse[bsel, :, r0:r1].contiguous(), piece.kind == "causal", self.scale,
        )  # fmt: skip
        dk, dv = self._fold(dk), self._fold(dv)
        if self.pad:
            dq, dk, dv = dq[..., :-_PAD], dk[..., :-_PAD], dv[..., :-_PAD]
        return dq, dk, dv
