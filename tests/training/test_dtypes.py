"""bf16 training keeps fp32 master weights, on the plain path and under DeepSpeed (ZeRO-2).

Three 4-step runs of the same tiny model and data in this process (a world of one gloo rank):
fp32 plain (the reference), bf16 plain and bf16 DeepSpeed. The bf16 losses must stay within
0.02 nat of fp32 (bf16 keeps 8 mantissa bits: relative error ~4e-3 per rounding, on losses near
8 a few 1e-3 after 4 steps; 0.02 is five times the worst seen) and the two bf16 paths within
0.01 of each other. The checkpoints show where the precision lives: the linear weights are
stored in bf16 (Megatron's torch norms keep fp32 weights), the plain path's optimizer state
holds fp32 master copies, DeepSpeed's its fp32 partitions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_ext.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, *overrides: str) -> list[float]:
    from megatron_ext.training.loop import train

    cfg = load_config(ROOT / "configs/run/tiny.yaml", [
        "parallel.context_parallel_size=1", "data.max_documents=2", "data.seq_length=64",
        "train.steps=4", "train.eval_batches=1", "train.warmup_steps=1",
        f"train.out_dir={out}", *overrides])
    return train(cfg, progress=False)["losses"]


def test_bf16_master_weights(world_of_one, tmp_path: Path) -> None:
    ref = _run(tmp_path / "fp32")
    plain = _run(tmp_path / "bf16", "train.dtype=bf16")
    ds = _run(tmp_path / "ds", "train.dtype=bf16", "deepspeed.enabled=true",
              "deepspeed.zero_stage=2")
    assert plain == pytest.approx(ref, abs=0.02) and ds == pytest.approx(ref, abs=0.02)
    assert plain == pytest.approx(ds, abs=0.01)
    assert plain != ref  # it really ran in bf16
    step = "checkpoints/step_00000004"
    marker = json.loads((tmp_path / "bf16" / step / "model" / "megatron_ext.json").read_text())
    linear = {k: t["dtype"] for k, t in marker["tensors"].items()
              if k.endswith(".weight") and "linear" in k}
    assert linear and set(linear.values()) == {"torch.bfloat16"}, linear  # (norms stay fp32)
    state = torch.load(tmp_path / "bf16" / step / "engine" / "optim_rank00000.pt",
                       weights_only=True)
    assert state["masters"] and {m.dtype for m in state["masters"]} == {torch.float32}
    optim = list((tmp_path / "ds" / step / "engine").glob("*optim_states.pt"))
    assert optim, sorted(p.name for p in (tmp_path / "ds" / step / "engine").iterdir())
