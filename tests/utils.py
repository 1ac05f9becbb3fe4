"""Shared test utilities: run a function on several CPU ranks (gloo) that meet via a FileStore.

``run_distributed(fn, world_size, tmp_path, **kw)`` spawns ``world_size`` processes; each joins a
process group through a FileStore in ``tmp_path`` (no fixed port), runs ``fn(rank, group, **kw)``
with one thread, the test seed and the same NaN-poisoned ``torch.empty`` for calls from
``megatron_ext.ops`` as tests/conftest.py installs in the test process. An exception in any
child fails the test with the child's traceback; a hang fails it after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import random
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    caller = sys._getframe(2).f_globals.get("__name__", "")  # who called torch.empty(_like)
    if caller.startswith("megatron_ext.ops") and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _nan_empty(*args, **kwargs):
    return _poisoned(_real_empty(*args, **kwargs))


def _nan_empty_like(*args, **kwargs):
    return _poisoned(_real_empty_like(*args, **kwargs))


def _worker(rank: int, fn: Callable, world_size: int, store_path: str, backend: str, kw: dict):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    torch.empty, torch.empty_like = _nan_empty, _nan_empty_like
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        fn(rank, dist.group.WORLD, **kw)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable,
    world_size: int,
    tmp_path: Path,
    backend: str = "gloo",
    timeout: float = 300.0,
    **kw,
) -> None:
    """Spawn ranks that meet via a FileStore in tmp_path; each runs fn(rank, group, **kw).

    ``fn`` must be a module-level function (it is pickled into the children).
    """
    store = str(tmp_path / f"store-{uuid.uuid4().hex}")
    ctx = mp.start_processes(
        _worker, args=(fn, world_size, store, backend, kw), nprocs=world_size, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException with the child traceback
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks: no result in {timeout} s")
