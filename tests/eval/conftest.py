"""Shared fixture of the eval tests: a tiny GPT checkpoint saved with the real checkpoint code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ext.checkpoint import save_megatron_checkpoint
from megatron_ext.config import config_from_dict
from megatron_ext.specs import build_gpt_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 64,
                                      "num_attention_heads": 4, "max_position_embeddings": 512},
                           "inference": {"max_seq_len": 512}})
    torch.manual_seed(0)
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=4096)
    path = tmp_path_factory.mktemp("ckpt") / "step_1"
    save_megatron_checkpoint(model, path, config=cfg)
    yield path
    ps.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
