"""Which kernel computes attention: one pure choice function, one override, one log line.

Every method reduces to one primitive: attention of queries against a key block under a mask
(causal, sliding window, chunked-local, documents, or arbitrary per-row key intervals, the shape
of the DCA passes and of every context-parallel block), returning (out, lse). This module
decides which implementation runs it. The choice is a pure function of what it depends on, so
it is unit-tested on a CPU for every device:

=================  ===========================================================================
backend            what it is
=================  ===========================================================================
cpu_fused          the fused ATen CPU flash kernel on the whole problem (plain causal / full)
cpu_blockwise      the block planner's pieces on the fused CPU kernel (any other mask)
torch_blockwise    the planner's pieces as plain torch tiles: any device, any dtype (the twin
                   of every GPU path, and the fp32 / fp64 path on CUDA)
flash_attn         flash-attn (CUDA, fp16 / bf16, causal / full / window) when it is installed
sdpa               PyTorch's fused CUDA attention (cuDNN, or flash by ``MEGATRON_EXT_SDPA_ENGINE``):
                   plain causal (top-left aligned) or full attention when the caller needs no
                   lse, e.g. a layer's self-attention on one process; and, for per-row key
                   intervals (CP blocks, DCA passes on request), the pieces of the interval plan
                   through the ATen ops that return the lse (``sdpa_tiles.py``). On an H200
                   (docs/benchmarks.md) cuDNN runs the causal forward at 1.3-1.5x and the
                   backward at 1.9-2.1x our Triton kernel, and a CP block's backward at 1.9x
triton             our Triton kernels (CUDA fp16 / bf16, head dim in ``HEAD_DIMS``): plain,
                   window, chunk and document masks, per-row key intervals (rows in
                   (document, position) order; else torch tiles), and the fused DCA kernel
=================  ===========================================================================

``reference`` (the dense fp32 definition) is not a candidate: it is the spec the tests compare
against. The CoCA prologue has its own, smaller choice (``choose_prologue``): the fused Triton
prologue on CUDA, torch elsewhere.

Override, for tests and debugging: the environment variable ``MEGATRON_EXT_ATTN_BACKEND`` or
the context manager ``force_backend(name)`` (the context manager wins). A forced backend that
cannot run the problem raises ``ValueError``; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from dataclasses import dataclass

import torch

from megatron_ext.ops.override import forced_choice

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "MASKS",
    "Installed",
    "choose_backend",
    "choose_prologue",
    "force_backend",
    "forced_backend",
    "installed",
    "resolve_backend",
]

BACKENDS = ("cpu_fused", "cpu_blockwise", "torch_blockwise", "flash_attn", "triton", "sdpa")
MASKS = ("causal", "full", "window", "chunk", "documents", "intervals", "dca")
"""Mask kinds: plain causal / full; sliding window; chunked-local (possibly with documents or a
window); documents (packed rows); intervals (per-row key ranges: CP blocks, DCA passes); dca
(the three DCA passes over one sequence, which the fused Triton kernel takes whole)."""
ENV_VAR = "MEGATRON_EXT_ATTN_BACKEND"
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
SDPA_PIECE_HEAD_DIMS = (64, 128)
"""Head dims whose interval pieces run on cuDNN by default (measured on an H200, bf16)."""
DCA_PIECES_MIN_SEQ = 65536
"""From this many query rows DCA (one document per row) runs as three passes on cuDNN pieces
rather than the fused Triton kernel: on an H200 (docs/benchmarks.md) the passes take 164.9 ms
forward + backward at 64K against 200.6 ms fused, but 20.2 against 16.8 ms at 16K; between the
two nothing is measured yet, so the fused kernel keeps them. Rows with packed documents always
take the passes (the fused kernel has no document mask)."""
_HALF = (torch.float16, torch.bfloat16)
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("attn_backend", default=None)
_log = logging.getLogger("megatron_ext")
_logged: set[tuple] = set()


@dataclass(frozen=True)
class Installed:
    """What this process can run (``installed()`` reads it once)."""

    fused_cpu: bool = False
    """torch has the fused ATen CPU flash-attention ops."""
    triton: bool = False
    """triton imports."""
    triton_interpreted: bool = False
    """the Triton kernels run in the interpreter (TRITON_INTERPRET=1): they take CPU tensors."""
    flash_attn: bool = False
    """flash-attn imports."""


@functools.cache
def installed() -> Installed:
    """What is importable / built into this process."""
    from megatron_ext.ops.cpu_flash import fused_cpu_available
    from megatron_ext.ops.triton.tiles import kernels_interpreted, triton_available

    try:
        import flash_attn  # noqa: F401

        has_flash = True
    except ImportError:
        has_flash = False
    return Installed(
        fused_cpu=fused_cpu_available(),
        triton=triton_available(),
        triton_interpreted=kernels_interpreted(),
        flash_attn=has_flash,
    )


def _check_mask(mask: str) -> None:
    if mask not in MASKS:
        raise ValueError(f"mask={mask!r}; expected one of {MASKS}")


def _triton_takes(device: str, head_dim: int, mask: str, have: Installed) -> bool:
    """Whether our Triton kernels can run this problem (whatever the dtype)."""
    if not have.triton or head_dim not in TRITON_HEAD_DIMS:
        return False
    return device == "cuda" or (device == "cpu" and have.triton_interpreted)


def choose_backend(
    device: str,
    dtype: torch.dtype,
    head_dim: int,
    mask: str,
    have: Installed,
    *,
    need_lse: bool = True,
    seq_len: int = 0,
) -> str:
    """The fastest correct backend for a problem (no override applied).

    Args:
        device: "cpu", "cuda", or another torch device type.
        dtype: q's dtype.
        head_dim: D.
        mask: one of ``MASKS``.
        have: what is installed (``installed()``).
        need_lse: the caller uses the lse (merging partial results, returning it), or its causal
            mask is not top-left aligned; False lets plain causal / full attention on CUDA take
            PyTorch's SDPA, which returns none.

        seq_len: query rows of the call (only ``mask="dca"`` reads it).

    Returns:
        One of ``BACKENDS``. For ``mask="dca"`` the answer is "triton" (the fused kernel), or
        "sdpa" / "torch_blockwise" (the three passes on the interval engine, whose tiles are
        then chosen with ``mask="intervals"``: cuDNN pieces from ``DCA_PIECES_MIN_SEQ`` rows on
        CUDA, where an H200 runs them faster than the fused kernel).
    """
    _check_mask(mask)
    half = dtype in _HALF
    if mask == "dca":
        pieces = device == "cuda" and half and head_dim in SDPA_PIECE_HEAD_DIMS
        if pieces and seq_len >= DCA_PIECES_MIN_SEQ:
            return "sdpa"
        fused = device == "cuda" and half and _triton_takes(device, head_dim, mask, have)
        return "triton" if fused else "torch_blockwise"
    if device == "cuda" and not need_lse and mask in ("causal", "full"):
        return "sdpa"
    if device == "cuda" and half and mask == "intervals" and head_dim in SDPA_PIECE_HEAD_DIMS:
        return "sdpa"
    if device == "cpu":
        if not have.fused_cpu:
            return "torch_blockwise"
        return "cpu_fused" if mask in ("causal", "full") else "cpu_blockwise"
    if device == "cuda" and half:
        if have.flash_attn and mask in ("causal", "full", "window"):
            return "flash_attn"
        if _triton_takes(device, head_dim, mask, have):
            return "triton"
    return "torch_blockwise"


def choose_prologue(device: str, dtype: torch.dtype, have: Installed) -> str:
    """Backend of the CoCA prologue: "triton" (fused kernel) or "torch"."""
    fused_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    return "triton" if device == "cuda" and dtype in fused_dtypes and have.triton else "torch"


def forced_backend() -> str | None:
    """The override in effect (context manager first, then the environment), or None."""
    name = _forced.get() or os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} / force_backend = {name!r}; expected one of {BACKENDS}")
    return name


def force_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Run the block with every attention call on backend ``name`` (None: automatic choice)."""
    return forced_choice(_forced, name, BACKENDS, "force_backend")


def resolve_backend(q: torch.Tensor, mask: str, *, need_lse: bool = True) -> str:
    """The backend for an input like ``q`` [B, S, H, D] and a mask kind: override or choice.

    Logs "attention backend: ..." once per distinct (choice, device, dtype, head dim, mask).
    """
    _check_mask(mask)
    name = forced_backend()
    how = "forced"
    if name is None:
        name = choose_backend(q.device.type, q.dtype, q.shape[-1], mask, installed(),
                              need_lse=need_lse, seq_len=q.shape[1])
        how = "auto"
    key = (name, q.device.type, q.dtype, q.shape[-1], mask)
    if key not in _logged:
        _logged.add(key)
        _log.info(
            "attention backend: %s (%s) for %s %s head_dim=%d mask=%s",
            name, how, q.device.type, str(q.dtype).removeprefix("torch."), q.shape[-1], mask,
        )  # fmt: skip
    return name


def resolve_prologue(x: torch.Tensor) -> str:
    """Backend of the CoCA prologue for x: the override maps "triton" -> triton, else torch."""
    name = forced_backend()
    if name is not None:
        return "triton" if name == "triton" else "torch"
    return choose_prologue(x.device.type, x.dtype, installed())
