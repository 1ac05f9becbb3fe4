"""The training entry point end to end: a tiny GPT on the embedded corpus.

Single process: the loss must fall over a few dozen steps (a learning signal, not a number),
and the run directory must hold the resolved config (reloading to the same object), the
world layout, the tensorboard events, metrics.jsonl (one record per step with step, loss, lr,
grad_norm, tokens_per_s) and the loss plot. Two ranks under torchrun on the plain (non-
DeepSpeed) path: one sequence split over both ranks (context parallel), with every layer
recomputed in backward (activation checkpointing re-runs the CP communication), trained to
the end, rank 0 logging every step. The DeepSpeed path, checkpoints and refusals are tested in
tests/training/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from utils import free_port, launcher_free_env

from megatron_ext.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_single_process_loss_falls(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_ext.train", "--config", "configs/run/tiny.yaml",
           "--no-progress", "--set", f"train.out_dir={out}", "--set", "train.steps=30",
           "--set", "data.max_documents=2", "--set", "train.eval_batches=2",
           "--set", "parallel.context_parallel_size=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_free_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(30))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in rows)
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals and evals[-1] < losses[0]
    cfg = load_config(out / "config.yaml")
    assert cfg.train.steps == 30 and cfg.train.out_dir == str(out)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "world.json").is_file() and (out / "checkpoints" / "latest").is_file()
    assert any((out / "tensorboard").iterdir())
    assert "held-out loss" in proc.stdout


@pytest.mark.distributed
def test_two_ranks_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "megatron_ext.train",
           "--config", "configs/run/tiny.yaml", "--no-progress",
           "--set", f"train.out_dir={out}", "--set", "train.steps=6",
           "--set", "train.activation_checkpointing=full"]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_free_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "tensor parallel 1 x context parallel 2 (zigzag, ring) x data parallel 1" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert sum(1 for line in proc.stdout.splitlines() if line.startswith("step ")) == 6

