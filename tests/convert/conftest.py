"""Fixtures of the conversion tests."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ext.dist import init_distributed

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def megatron_single_process():
    """One-rank gloo group and Megatron parallel state (TP = PP = CP = 1) for a test module."""
    init_distributed()
    ps.initialize_model_parallel(1)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()
