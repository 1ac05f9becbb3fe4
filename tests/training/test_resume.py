"""Checkpoints as a user meets them: kill -9 and resume, corrupted files, a diverging run.

- Resume after `kill -9`: a run is killed (SIGKILL, no clean-up) once it has logged step 4 of
  8, with checkpoints every 2 steps, then restarted with `--resume`. Its per-step losses and
  gradient norms must equal an uninterrupted run's to 1e-6 (fp32 on CPU: the same kernels on
  the same bits, so any difference would mean a lost RNG, data position or optimizer state;
  1e-6 leaves room only for nothing). metrics.jsonl must hold each step exactly once.
- A truncated or altered file of a checkpoint is refused by `verify_checkpoint` and by
  `--resume`, naming the file; a missing manifest and a dangling `latest` are refused too.
- `train.lr=1e6` makes the loss non-finite: the run exits with status 3 and a message naming
  the step, and the last checkpoint it saved before still verifies.
- Final evaluation runs once when `train.eval_interval` divides `train.steps`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_utils import REPO, TINY, env, losses, metrics, run_train, sets, tail

from megatron_ext.checkpoint import CheckpointError
from megatron_ext.training.checkpointing import resolve_checkpoint, verify_checkpoint

pytestmark = pytest.mark.slow

ARGS = [*TINY, *sets(train__steps=8, train__save_interval=2, train__keep_checkpoints=2,
                     train__eval_interval=4, model__hidden_dropout=0.1,
                     train__peak_tflops=1.0)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_train([*ARGS, "--set", f"train.out_dir={out}"])
    assert proc.returncode == 0, tail(proc)
    return out


def test_uninterrupted_run_layout(reference: Path) -> None:
    rows = metrics(reference)
    assert [r["step"] for r in rows] == list(range(8))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r) for r in rows)
    assert all(0 < r["mfu"] < 1 for r in rows)  # against a 1 TFLOP/s peak given in the config
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 7]  # final eval not repeated
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000006", "step_00000008"]  # keep-last-2
    assert resolve_checkpoint(reference).name == "step_00000008"
    manifest = verify_checkpoint(resolve_checkpoint(reference))
    assert manifest["step"] == 8 and "model/megatron_ext.json" in manifest["files"]
    assert (reference / "world.json").is_file() and (reference / "config.yaml").is_file()


def test_kill9_then_resume_equals_uninterrupted(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_ext.train", *ARGS, "--set", f"train.out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            path = out / "metrics.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(losses(out)) < 8
    resumed = run_train([*ARGS, "--set", f"train.out_dir={out}", "--resume"])
    assert resumed.returncode == 0, tail(resumed)
    assert "resumed from" in resumed.stdout
    ref, got = metrics(reference), metrics(out)
    assert [r["step"] for r in got] == list(range(8))
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6, (a, b)
        assert a["lr"] == b["lr"]


def _copy(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    return out


@pytest.mark.parametrize("damage, match", [
    ("truncate", r"state_rank00000.pt has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
    ("flip", r"model/__0_0.distcp does not match its SHA-256"),
    ("delete", r"engine/optim_rank00000.pt is missing"),
    ("no-manifest", r"has no manifest.json"),
])
def test_corrupt_checkpoint_refused_by_name(reference: Path, tmp_path: Path, damage: str,
                                            match: str) -> None:
    out = _copy(reference, tmp_path)
    ck = resolve_checkpoint(out)
    if damage == "truncate":
        f = ck / "state_rank00000.pt"
        f.write_bytes(f.read_bytes()[:-10])
    elif damage == "flip":
        f = ck / "model" / "__0_0.distcp"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "delete":
        (ck / "engine" / "optim_rank00000.pt").unlink()
    else:
        (ck / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(ck)
    if damage == "truncate":  # and as a user meets it: --resume refuses, writes nothing
        before = (out / "config.yaml").read_bytes(), (out / "metrics.jsonl").read_bytes()
        proc = run_train([*ARGS, "--set", f"train.out_dir={out}", "--set", "train.steps=10",
                          "--resume"])
        assert proc.returncode == 2, tail(proc)
        assert "state_rank00000.pt" in proc.stderr and "truncated" in proc.stderr
        assert ((out / "config.yaml").read_bytes(), (out / "metrics.jsonl").read_bytes()) \
            == before


def test_dangling_latest(reference: Path, tmp_path: Path) -> None:
    out = _copy(reference, tmp_path)
    (out / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match=r"names 'step_00000099', which does not exist"):
        resolve_checkpoint(out)


def test_nan_loss_stops_with_checkpoint_intact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_train([*TINY, *sets(train__steps=12, train__save_interval=1, train__lr=1e6,
                                   train__warmup_steps=0, train__out_dir=out)])
    assert proc.returncode == 3, tail(proc)
    assert "training stopped:" in proc.stderr and "non-finite" in proc.stderr
    assert "the last good checkpoint is" in proc.stderr
    last = resolve_checkpoint(out)
    manifest = verify_checkpoint(last)
    rows = metrics(out)
    assert manifest["step"] == len(rows)  # saved after every finite step, none after
    assert not list((out / "checkpoints").glob(".*partial"))
