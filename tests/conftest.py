"""Shared test setup.

- Seeds torch and random for every test, so failures reproduce.
- Poisons scratch memory: `torch.empty` / `torch.empty_like` called from `megatron_ext.ops`
  return NaN-filled floating tensors, so an output element an op forgets to write shows up as a
  NaN instead of passing by luck with whatever bytes the allocator handed back.
- Markers (`gpu`, `distributed`, `slow`) are declared in pyproject.toml; `gpu` tests are skipped
  when CUDA is absent.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from utils import nan_empty, nan_empty_like  # tests/ is on sys.path (rootdir conftest)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import on CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")

@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    random.seed(0)
    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def megatron_single_process():
    """One-rank gloo group and Megatron parallel state (TP = PP = CP = 1) for a test module."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ext.dist import init_distributed

    init_distributed(backend="gloo")
    ps.initialize_model_parallel(1)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def world_of_one():
    """A one-rank process group (launcher environment or defaults) for a test module."""
    import torch.distributed as dist

    from megatron_ext.dist import init_distributed

    init_distributed()
    yield
    dist.destroy_process_group()
