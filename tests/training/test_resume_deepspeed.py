"""Exact resume on the DeepSpeed path (ZeRO-2 and ZeRO-3, one gloo rank in this process).

A 4-step run saves checkpoints at steps 2 and 4. Its directory is copied, the step-4
checkpoint removed and `latest` pointed at step 2, and the copy resumed with `--resume`
semantics: steps 2 and 3 must reproduce the original losses and gradient norms to 1e-6
(fp32 on CPU, the same arithmetic on restored bits: DeepSpeed's module, optimizer partitions
and LambdaLR state, our data position and RNG states), and metrics.jsonl must hold steps 0-3
once each. Resuming a finished run, or with another batch shape, is refused before any file
of the run changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from train_utils import metrics

from megatron_ext.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_is_exact(world_of_one, tmp_path: Path, stage: int) -> None:
    from megatron_ext.training.loop import train

    def cfg(out: Path):
        return load_config(ROOT / "configs/run/tiny.yaml", [
            "parallel.context_parallel_size=1", "data.max_documents=2", "data.seq_length=64",
            "train.steps=4", "train.eval_batches=1", "train.warmup_steps=1",
            "train.save_interval=2", "train.keep_checkpoints=0", "model.hidden_dropout=0.1",
            "deepspeed.enabled=true", f"deepspeed.zero_stage={stage}", f"train.out_dir={out}"])

    first = tmp_path / "first"
    train(cfg(first), progress=False)
    second = tmp_path / "second"
    shutil.copytree(first, second)
    shutil.rmtree(second / "checkpoints" / "step_00000004")
    (second / "checkpoints" / "latest").write_text("step_00000002\n")
    result = train(cfg(second), progress=False, resume=True)
    assert len(result["losses"]) == 2
    ref, got = metrics(first), metrics(second)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6, (a, b)
        assert a["lr"] == b["lr"]


def test_resume_refusals_write_nothing(world_of_one, tmp_path: Path) -> None:
    from megatron_ext.checkpoint import CheckpointError
    from megatron_ext.config import ConfigError
    from megatron_ext.training.loop import train

    out = tmp_path / "run"
    base = ["parallel.context_parallel_size=1", "data.max_documents=2", "data.seq_length=64",
            "train.eval_batches=1", "deepspeed.enabled=true", "deepspeed.zero_stage=1",
            f"train.out_dir={out}"]
    train(load_config(ROOT / "configs/run/tiny.yaml", [*base, "train.steps=2"]), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"is at step 2 and train.steps=2; raise train.steps"):
        train(load_config(ROOT / "configs/run/tiny.yaml", [*base, "train.steps=2"]),
              progress=False, resume=True)
    with pytest.raises(CheckpointError, match=r"micro_batch_size: checkpoint 4, this run 2"):
        train(load_config(ROOT / "configs/run/tiny.yaml",
                          [*base, "train.steps=4", "train.micro_batch_size=2"]),
              progress=False, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
