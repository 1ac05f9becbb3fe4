"""Shared by the training tests: run `python -m megatron_ext.train` (or a launcher) as a new
user would, and read what the run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from utils import free_port, launcher_free_env

REPO = Path(__file__).resolve().parents[2]

# a tiny, fast run: 2 documents, 64-token rows, 4 rows per micro-batch
TINY = ["--config", "configs/run/tiny.yaml", "--no-progress", "--set", "data.max_documents=2",
        "--set", "data.seq_length=64", "--set", "train.eval_batches=1",
        "--set", "parallel.context_parallel_size=1", "--set", "train.warmup_steps=2"]


def env() -> dict[str, str]:
    e = launcher_free_env()
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e["PYTHONWARNINGS"] = "ignore"
    return e


def sets(**kv: object) -> list[str]:
    """--set arguments from section__key=value keywords."""
    out = []
    for k, v in kv.items():
        out += ["--set", f"{k.replace('__', '.')}={v}"]
    return out


def run_train(args: list[str], *, launcher: list[str] | None = None, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    """`python -m megatron_ext.train ARGS` (or LAUNCHER ... --module megatron_ext.train ARGS)."""
    head = [sys.executable, "-m", "megatron_ext.train"] if launcher is None else \
        [*launcher, "--module", "megatron_ext.train"]
    return subprocess.run([*head, *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def deepspeed_launcher(n: int) -> list[str]:
    exe = Path(sys.executable).with_name("deepspeed")
    return [str(exe), "--num_gpus", str(n), "--master_port", str(free_port())]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out)]


def tail(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-5000:]


__all__ = ["REPO", "TINY", "deepspeed_launcher", "env", "losses", "metrics", "os", "run_train",
           "sets", "tail"]
