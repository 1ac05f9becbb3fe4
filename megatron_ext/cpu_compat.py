"""CPU workarounds for megatron-core 0.16, applied only when CUDA is absent.

megatron-core 0.16 hard-codes `torch.cuda` in a few places (device queries, synchronisation).
megatron_ext's own core attention replaces the stock `DotProductAttention` and RoPE module, so the
forward and backward path needs none of them; what does need them on a CPU machine (a laptop, CI)
is `megatron.core.dist_checkpointing`'s torch_dist save path, which calls:

- `megatron/core/dist_checkpointing/strategies/filesystem_async.py`,
  `FileSystemWriterAsync.preload_tensors`: `torch.cuda.synchronize()` after staging the tensors
  on the host. Routed to a no-op: CPU-to-CPU copies are already complete.
- `megatron/core/dist_checkpointing/strategies/state_dict_saver.py`,
  `save_state_dict_async_finalize`: `torch.cuda.current_device()` as the device of the
  write-failure flag it broadcasts. Routed to `torch.device("cpu")` (gloo broadcasts CPU tensors).

Each workaround is scoped to its one upstream module: that module's global name `torch` is
replaced by a view of torch in which only the named `torch.cuda.<function>` is the CPU stand-in
and every other attribute is the real torch. The process-wide `torch.cuda` is never touched, so
any other CUDA-only call still fails loudly. `apply_cpu_workarounds()` is idempotent;
`applied_cpu_workarounds()` lists what is active and `remove_cpu_workarounds()` restores the
upstream modules.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CpuWorkaround:
    """One upstream `torch.cuda` call routed to a CPU stand-in."""

    name: str
    """Short identifier."""
    module: str
    """Upstream module whose `torch.cuda.<cuda_function>` is routed."""
    upstream_call: str
    """The upstream file, function and call that is routed."""
    cuda_function: str
    """Attribute of `torch.cuda` replaced inside `module` only."""
    replacement: Callable[..., Any]
    """What the call does instead."""


def _no_synchronize(*args: object, **kwargs: object) -> None:
    """CPU tensors are copied synchronously; there is no device stream to wait for."""


def _cpu_device(*args: object, **kwargs: object) -> torch.device:
    return torch.device("cpu")


WORKAROUNDS: tuple[CpuWorkaround, ...] = (
    CpuWorkaround(
        name="dist_checkpointing_preload_synchronize",
        module="megatron.core.dist_checkpointing.strategies.filesystem_async",
        upstream_call="megatron/core/dist_checkpointing/strategies/filesystem_async.py "
        "FileSystemWriterAsync.preload_tensors: torch.cuda.synchronize()",
        cuda_function="synchronize",
        replacement=_no_synchronize,
    ),
    CpuWorkaround(
        name="dist_checkpointing_finalize_device",
        module="megatron.core.dist_checkpointing.strategies.state_dict_saver",
        upstream_call="megatron/core/dist_checkpointing/strategies/state_dict_saver.py "
        "save_state_dict_async_finalize: torch.cuda.current_device()",
        cuda_function="current_device",
        replacement=_cpu_device,
    ),
)


class _CudaView:
    """`torch.cuda` with a few functions replaced; everything else is the real module."""

    def __init__(self) -> None:
        self._overrides: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(torch.cuda, name)


class _TorchView(types.ModuleType):
    """`torch` whose `cuda` attribute is a `_CudaView`; everything else is the real torch."""

    def __init__(self, original: types.ModuleType) -> None:
        super().__init__(original.__name__, original.__doc__)
        self.cuda = _CudaView()
        self._original = original

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_applied: dict[str, CpuWorkaround] = {}


def apply_cpu_workarounds() -> tuple[str, ...]:
    """Route megatron-core's CUDA-only calls in `WORKAROUNDS` to CPU when CUDA is absent.

    Safe to call any number of times (a workaround already in place is left as it is). With
    CUDA available nothing is changed.

    Returns:
        Names of the workarounds now in place (empty with CUDA).
    """
    if torch.cuda.is_available():
        return tuple(_applied)
    for workaround in WORKAROUNDS:
        if workaround.name in _applied:
            continue
        module = importlib.import_module(workaround.module)
        view = module.torch
        if not isinstance(view, _TorchView):
            view = _TorchView(view)
            module.torch = view
        view.cuda._overrides[workaround.cuda_function] = workaround.replacement
        _applied[workaround.name] = workaround
    return tuple(_applied)


def applied_cpu_workarounds() -> tuple[CpuWorkaround, ...]:
    """The workarounds currently in place, each naming the upstream call it routes."""
    return tuple(_applied.values())


def remove_cpu_workarounds() -> None:
    """Undo `apply_cpu_workarounds`: the upstream modules see the real torch again."""
    for workaround in list(_applied.values()):
        module = importlib.import_module(workaround.module)
        if isinstance(module.torch, _TorchView):
            module.torch = module.torch._original
        del _applied[workaround.name]


__all__ = [
    "WORKAROUNDS",
    "CpuWorkaround",
    "applied_cpu_workarounds",
    "apply_cpu_workarounds",
    "remove_cpu_workarounds",
]
