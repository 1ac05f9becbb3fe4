"""Shared test utilities: run a function on several CPU ranks (gloo) that meet via a FileStore.

``run_distributed(fn, world_size, tmp_path, **kw)`` spawns ``world_size`` processes; each joins a
process group through a FileStore in ``tmp_path`` (no fixed port), runs ``fn(rank, group, **kw)``
with one thread, the test seed and the same NaN-poisoned ``torch.empty`` for calls from
``megatron_ext.ops`` as tests/conftest.py installs in the test process. An exception in any
child fails the test with the child's traceback; a hang fails it after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
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
    if caller.startswith("megatron_ext.ops") and (t.is_floating_point() or t.is_complex()):
        t.fill_(float("nan"))
    return t


def nan_empty(*args, **kwargs):
    """torch.empty that NaN-fills floating tensors allocated by megatron_ext.ops."""
    return _poisoned(_real_empty(*args, **kwargs))


def nan_empty_like(*args, **kwargs):
    """torch.empty_like that NaN-fills floating tensors allocated by megatron_ext.ops."""
    return _poisoned(_real_empty_like(*args, **kwargs))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for launchers that need a master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_free_env() -> dict[str, str]:
    """os.environ without any launcher variable, one thread per process: a clean child env."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_",
                                "PMI_", "TORCHELASTIC"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _worker(rank: int, fn: Callable, world_size: int, store_path: str, backend: str, kw: dict):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    torch.empty, torch.empty_like = nan_empty, nan_empty_like
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


def tiny_hf_llama(tmp: Path, name: str = "hf") -> Path:
    """A random 2-layer Llama (GQA, untied) saved by transformers under tmp/name, with the
    package's tokenizer beside it (so its vocabulary is the tokenizer's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_ext.data.tokenizer import load_tokenizer, to_hf_tokenizer

    tok = load_tokenizer(None)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp / name
    AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").save_pretrained(out)
    to_hf_tokenizer(tok).save_pretrained(out)
    return out
