"""Training checkpoints: atomic, verified, resumable to the exact step.

Layout of `out_dir/checkpoints/`:

    latest                  the name of the newest complete checkpoint (replaced atomically)
    step_00000010/
      model/                the weights as a megatron_ext distributed checkpoint (loads at any
                            tensor-parallel size; `train.init_from` reads only this)
      engine/               optimizer and schedule: DeepSpeed's own files (ZeRO partitions
                            included) or the plain path's optim_rank<N>.pt
      state_rank<N>.pt      per rank: step, data position, every RNG state
      config.yaml           the resolved run config
      manifest.json         written last: step, world layout, size and SHA-256 of every file

Atomicity: all ranks write into `.step_N.partial/`; after a barrier rank 0 hashes every file,
writes the manifest, renames the directory to `step_N`, then points `latest` at it and deletes
checkpoints beyond `train.keep_checkpoints`. A process killed at any moment leaves either the
previous `latest` (whose directory is untouched) or the new one complete; a `.partial`
directory is never loaded and is cleared by the next save. Loading checks the manifest (every
file present, same size, same hash) and names the first file that differs.

Files of our own are loaded with `torch.load(weights_only=True)`; RNG states are stored as
tensors and plain numbers for that reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_ext.checkpoint import CheckpointError, fsync_dir, read_json

FORMAT = "megatron_ext.training_checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
PREFIX = "step_"


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _broadcast_error(error: BaseException | None) -> None:
    """Rank 0's outcome to every rank; every rank raises if rank 0 failed."""
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise CheckpointError(f"rank 0 failed: {message[0]}")


# ---------------------------------------------------------------------------- RNG state

def capture_rng() -> dict[str, Any]:
    """Every RNG the loop touches: torch CPU (+ CUDA), Python `random`, NumPy's global one."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------- save

def save_checkpoint(root: Path, step: int, *, engine, rank_state: dict[str, Any],
                    config_text: str, layout: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `root/step_<step>` atomically (collective: every rank calls it).

    Args:
        root: out_dir/checkpoints.
        step: optimizer steps completed.
        engine: `PlainEngine` or `DeepSpeedEngine` (writes its own optimizer files).
        rank_state: this rank's step, data position and RNG states.
        config_text: the resolved config YAML.
        layout: the world layout (sizes of TP, CP, DP, engine kind) the checkpoint needs.
        keep: newest checkpoints to keep (0 keeps all).
    """
    from megatron_ext.checkpoint import save_megatron_checkpoint

    rank = dist.get_rank()
    target = root / step_name(step)
    partial = root / f".{target.name}.partial"
    error: BaseException | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".*.partial"):  # saves that died
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir()
        except OSError as e:
            error = e
    _broadcast_error(error)
    with engine.gathered():
        save_megatron_checkpoint(engine.module, partial / "model")
    engine.save(partial / "engine", rank)
    torch.save(rank_state, partial / f"state_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        try:
            (partial / "config.yaml").write_text(config_text, encoding="utf-8")
            manifest = {"format": FORMAT, "version": VERSION, "step": step, "layout": layout,
                        "files": _files(partial)}
            _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
            old = None
            if target.exists():
                old = root / f".{target.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(target, old)
            os.rename(partial, target)
            fsync_dir(root)
            _write_atomic(root / LATEST, target.name + "\n")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if keep:
                for stale in list_checkpoints(root)[:-keep]:
                    if stale != target:
                        shutil.rmtree(stale, ignore_errors=True)
        except BaseException as e:  # reported to every rank, then re-raised
            error = e
    _broadcast_error(error)
    return target


# ---------------------------------------------------------------------------- find + verify

def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit())


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory, its `checkpoints/`, or `step_N` itself.

    Raises:
        CheckpointError: nothing there, or `latest` points at a directory that is gone.
    """
    p = Path(path).expanduser().absolute()
    if (p / MANIFEST).is_file() or p.name.startswith(PREFIX):
        return p
    for root in (p / "checkpoints", p):
        if (root / LATEST).is_file():
            name = (root / LATEST).read_text(encoding="utf-8").strip()
            if not (root / name).is_dir():
                raise CheckpointError(f"{root / LATEST} names {name!r}, which does not exist")
            return root / name
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    raise CheckpointError(f"{p} holds no checkpoint: expected a run directory with "
                          f"checkpoints/{LATEST}, a checkpoints directory with {LATEST}, or a "
                          f"{PREFIX}N directory with {MANIFEST}")


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest; returns the manifest.

    Raises:
        CheckpointError: naming the directory and the first file that is missing, has another
            size, or another SHA-256, or a missing / corrupt manifest.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: an incomplete save or not a "
                              "training checkpoint")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: version {manifest.get('version')!r}; this code reads "
                              f"version {VERSION}")
    for name, want in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} is missing")
        size = file.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} has {size} bytes, "
                                  f"the manifest says {want['size']} (truncated?)")
        if _sha256(file) != want["sha256"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} does not match "
                                  "its SHA-256 in the manifest")
    return manifest


def verify_on_rank0(directory: Path) -> dict[str, Any]:
    """`verify_checkpoint` by rank 0, its result (or error) on every rank."""
    error: BaseException | None = None
    manifest: dict[str, Any] | None = None
    if dist.get_rank() == 0:
        try:
            manifest = verify_checkpoint(directory)
        except CheckpointError as e:
            error = e
    _broadcast_error(error)
    box = [manifest]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------- load

def check_layout(manifest: dict[str, Any], layout: dict[str, Any], directory: Path) -> None:
    """Refuse to resume a checkpoint saved by another world layout (naming what differs)."""
    saved = manifest["layout"]
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in layout.items()
            if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"checkpoint {directory} was saved by another world layout and "
                              f"cannot resume here exactly ({'; '.join(diff)}); start a new run "
                              "with train.init_from to reuse its weights")


def load_checkpoint(directory: Path, *, engine, layout: dict[str, Any], deepspeed: bool,
                    verified: bool = False) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and this rank's state from a verified checkpoint.

    `verified=True` skips hashing a checkpoint that `verify_checkpoint` passed just before.
    Returns this rank's saved state (step, data position, RNG states); the caller restores
    the RNGs last, after everything that may draw random numbers.

    Raises:
        CheckpointError: corrupt checkpoint, or one saved by another world layout.
    """
    from megatron_ext.checkpoint import load_megatron_checkpoint

    if verified:  # hashed already: read the layout only
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    else:
        manifest = verify_on_rank0(directory)
    check_layout(manifest, layout, directory)
    rank = dist.get_rank()
    if not deepspeed:
        load_megatron_checkpoint(engine.module, directory / "model")
    try:
        engine.load(directory / "engine", rank)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {directory}: {e}") from e
    state_path = directory / f"state_rank{rank:05d}.pt"
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {state_path.name}")
    return torch.load(state_path, map_location="cpu", weights_only=True)


__all__ = [
    "CheckpointError", "capture_rng", "check_layout", "list_checkpoints", "load_checkpoint",
    "resolve_checkpoint", "restore_rng", "save_checkpoint", "step_name", "verify_checkpoint",
    "verify_on_rank0",
]
