"""Training on CUDA: every attention variant trains 3 steps with the model, batches and RNG on
the GPU (Megatron initialises the weights there; `use_cpu_initialization` is CPU-only).

Each tiny model config (configs/model/tiny_*.yaml) runs 3 steps in this process; the run must
report `on cuda`, every loss must be finite and the first must be near ln(vocab) (a fresh
model predicts uniformly: within 0.5 nat). With 2 GPUs the same runs under torchrun with
context parallelism (CP=2). Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from utils import free_port, launcher_free_env

from megatron_ext.config import load_config

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["tiny_rope", "tiny_nope", "tiny_hybrid_swa", "tiny_dca", "tiny_coca"]
RUN = ["train.steps=3", "train.warmup_steps=1", "train.micro_batch_size=2",
       "data.seq_length=96", "data.max_documents=2", "train.eval_batches=1"]


@pytest.fixture(scope="module")
def cuda_world():
    from megatron_ext.dist import init_distributed

    init_distributed()
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_on_cuda(cuda_world, tmp_path: Path, capsys, name: str) -> None:
    from megatron_ext.training.loop import train

    cfg = load_config(ROOT / "configs/model" / f"{name}.yaml",
                      [*RUN, f"train.out_dir={tmp_path / 'run'}"])
    result = train(cfg, progress=False)
    assert "on cuda" in capsys.readouterr().out
    losses = result["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(4096)) < 0.5, losses


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_cp2_on_two_gpus(tmp_path: Path, name: str) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "megatron_ext.train",
           "--config", f"configs/model/{name}.yaml", "--no-progress",
           *[a for kv in RUN for a in ("--set", kv)], "--set", f"train.out_dir={out}",
           "--set", "parallel.context_parallel_size=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_free_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "context parallel 2" in proc.stdout and "on cuda" in proc.stdout
