"""Megatron distributed checkpoints (torch_dist backend) of GPT models, written atomically.

`save_megatron_checkpoint(model, directory)` stores `model.sharded_state_dict()` with
`megatron.core.dist_checkpointing`; tensors are kept with their global shapes, so a checkpoint
saved at one tensor-parallel size loads at another (megatron-core reshards on load).
`load_megatron_checkpoint(model, directory)` checks the checkpoint against the model first and
names what differs.

A checkpoint directory holds megatron-core's files (`.metadata`, `__<rank>_<i>.distcp`,
`common.pt`, `metadata.json`), `config.yaml` when a run config is given, and the marker
`megatron_ext.json`, written last: format version, the model's description (sizes, attention
settings, the tensor-parallel size it was saved at), every tensor's global shape and dtype, and
the size of every file.

Atomicity: every rank writes into the sibling `.<name>.partial`; once all ranks are done, rank 0
writes the marker and renames the directory into place. An existing checkpoint at the target is
swapped out (and restored if the rename fails). A save that dies leaves at most a `.partial`
directory, which has no marker unless it was complete; loading requires the marker and checks
that every file it lists is present with its recorded size.

All ranks must call both functions (they are collective over the default process group). On a
machine without CUDA, `megatron_ext.cpu_compat` workarounds are applied first. The first save in
a process makes megatron-core start a spawn-context multiprocessing Manager, which re-imports the
main script: guard entry points with `if __name__ == "__main__":` or the save hangs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core import __version__ as megatron_version
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext.cpu_compat import apply_cpu_workarounds
from megatron_ext.typed_yaml import to_dict

FORMAT = "megatron_ext.dist_checkpoint"
FORMAT_VERSION = 1
MARKER = "megatron_ext.json"
CONFIG_FILE = "config.yaml"

# Model description recorded in the marker and compared on load (attribute of the model's
# TransformerConfig, or of the model for the last two).
# fmt: off
_CONFIG_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "gated_linear_unit", "add_bias_linear", "qk_layernorm",
    "attention_variant", "coca_form", "rotary_base", "rotary_percent", "rope_scaling",
    "no_rope_freq", "window_size", "window_attn_skip_freq", "attention_chunk_size",
    "chunked_attn_skip_freq", "dca_chunk_size", "dca_local_size", "qk_l2_norm",
)
# fmt: on
_MODEL_FIELDS = ("vocab_size", "share_embeddings_and_output_weights")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """The model description stored in (and compared against) a checkpoint's marker."""
    config = getattr(model, "config", None)
    out = {name: getattr(config, name, None) for name in _CONFIG_FIELDS}
    out.update({name: getattr(model, name, None) for name in _MODEL_FIELDS})
    return _jsonable(out)


def _expected_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Global shape of every tensor the model would load, by checkpoint key."""
    sharded = model.sharded_state_dict()
    apply_factories(sharded)  # e.g. SwiGLU's fused fc1 becomes its stored form
    return {
        item.key: list(item.global_shape)
        for item in nested_values(sharded)
        if isinstance(item, ShardedTensor)
    }


def _check_call(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    if not hasattr(model, "sharded_state_dict"):
        raise ValueError(
            f"model of type {type(model).__name__} has no sharded_state_dict(); "
            "expected a Megatron-core module such as GPTModel"
        )
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"directory={directory!r}; expected a path")
    if not dist.is_initialized():
        raise ValueError(
            "torch.distributed is not initialised; call "
            "megatron_ext.dist.init_distributed() and initialise Megatron's "
            "parallel state first"
        )
    return Path(directory).absolute()


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}")


def _broadcast_error(error: BaseException | None) -> None:
    """Rank 0's outcome to every rank; all raise if rank 0 failed."""
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise CheckpointError(f"checkpoint save failed on rank 0: {message[0]}")


def _config_text(config: Any) -> str:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = to_dict(config)
    if not isinstance(config, dict):
        raise ValueError(
            f"config of type {type(config).__name__}; expected a RunConfig (or any "
            "config dataclass) or a dict"
        )
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def _write_marker(partial: Path, marker: dict[str, Any]) -> None:
    marker["files"] = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}
    tmp = partial / f"{MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, partial / MARKER)
    fsync_dir(partial)


def read_json(path: Path, error: type[Exception] = CheckpointError) -> Any:
    """The JSON in `path`; a file that is not valid JSON raises `error` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is corrupt (not valid JSON: {e})") from e


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_replaceable(target: Path) -> None:
    """Refuse a target that is a file or a non-empty directory other than a checkpoint."""
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    if any(target.iterdir()) and not (target / MARKER).is_file():
        raise CheckpointError(
            f"{target} exists, is not empty and is not a megatron_ext checkpoint; refusing to "
            "replace it"
        )


def _publish(partial: Path, target: Path) -> None:
    """Rename the finished `partial` directory to `target`, swapping out an old checkpoint."""
    _check_replaceable(target)
    old = None
    if target.exists() and any(target.iterdir()):
        old = _sibling(target, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    elif target.exists():
        target.rmdir()
    try:
        os.rename(partial, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_megatron_checkpoint(
    model: torch.nn.Module, directory: str | os.PathLike, *, config: Any = None
) -> Path:
    """Save `model` as a Megatron distributed checkpoint (torch_dist), atomically.

    Collective: every rank of the default process group calls it. Tensor-parallel shards are
    stored with their global shapes, so the checkpoint loads at any tensor-parallel size.

    Args:
        model: a Megatron-core module (e.g. the GPTModel of `build_gpt_model`), on every rank.
        directory: the checkpoint directory; its parent is created if missing. An existing
            megatron_ext checkpoint there is replaced; any other non-empty directory is refused.
        config: the run config (a `RunConfig` or any config dataclass, or a dict) to store as
            `config.yaml` beside the weights, or None.

    Returns:
        The absolute checkpoint directory.

    Raises:
        ValueError: bad arguments, or torch.distributed not initialised.
        CheckpointError: the target cannot be replaced, or the save failed on rank 0.
    """
    target = _check_call(model, directory)
    config_text = None if config is None else _config_text(config)
    apply_cpu_workarounds()
    partial = _sibling(target, "partial")
    rank = dist.get_rank()
    error: BaseException | None = None
    if rank == 0:
        try:
            _check_replaceable(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that died
            partial.mkdir()
        except (OSError, CheckpointError) as e:
            error = e
    _broadcast_error(error)

    try:
        dist_checkpointing.save(model.sharded_state_dict(), str(partial))
    except BaseException:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise

    if rank == 0:
        try:
            tensors = dist_checkpointing.load_tensors_metadata(str(partial))
            if config_text is not None:
                (partial / CONFIG_FILE).write_text(config_text, encoding="utf-8")
            marker = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "backend": "torch_dist",
                "megatron_core": megatron_version,
                "torch": torch.__version__,
                "world_size": dist.get_world_size(),
                "tensor_parallel_size": getattr(
                    getattr(model, "config", None), "tensor_model_parallel_size", 1
                ),
                "model": describe_model(model),
                "tensors": {
                    key: {"shape": list(t.global_shape), "dtype": str(t.dtype)}
                    for key, t in sorted(tensors.items())
                },
            }
            _write_marker(partial, marker)
            _publish(partial, target)
        except BaseException as e:  # reported to every rank, then re-raised
            shutil.rmtree(partial, ignore_errors=True)
            error = e
    _broadcast_error(error)
    return target


def read_checkpoint_info(directory: str | os.PathLike) -> dict[str, Any]:
    """Validate a checkpoint directory on disk and return its marker.

    Needs neither a model nor torch.distributed. Checks the marker (format, version) and that
    every file it lists is present with its recorded size.

    Raises:
        CheckpointError: naming the directory and what is missing, corrupt or unknown.
    """
    path = Path(directory).absolute()
    if not path.is_dir():
        hint = ""
        if _sibling(path, "partial").exists():
            hint = f" ({_sibling(path, 'partial').name} exists: a save that did not finish)"
        elif _sibling(path, "old").exists():
            hint = (
                f" ({_sibling(path, 'old').name} exists: the previous checkpoint, moved "
                "aside by a save that did not finish)"
            )
        raise CheckpointError(f"checkpoint directory {path} does not exist{hint}")
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(
            f"{path} has no {MARKER}: not a complete megatron_ext checkpoint (a save that did "
            "not finish, or a directory written by other code)"
        )
    marker = read_json(marker_path)
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(f"{marker_path} is not a {FORMAT} marker")
    if marker.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{marker_path}: format version {marker.get('version')!r}; this "
            f"megatron_ext reads version {FORMAT_VERSION}"
        )
    for key in ("model", "tensors", "files"):
        if not isinstance(marker.get(key), dict):
            raise CheckpointError(f"{marker_path} is corrupt: {key!r} missing or not a mapping")
    problems = []
    for name, size in marker["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, expected {size}")
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt: " + "; ".join(problems))
    return marker


def _mismatch(marker: dict[str, Any], model: torch.nn.Module) -> list[str]:
    """Differences in tensor keys and global shapes between checkpoint and model."""
    saved, wanted = marker["tensors"], _expected_shapes(model)
    out = []
    missing = sorted(set(wanted) - set(saved))
    if missing:
        out.append(f"missing from the checkpoint: {', '.join(missing)}")
    extra = sorted(set(saved) - set(wanted))
    if extra:
        out.append(f"in the checkpoint but not in the model: {', '.join(extra)}")
    for key in sorted(set(saved) & set(wanted)):
        if saved[key]["shape"] != wanted[key]:
            out.append(
                f"{key}: checkpoint shape {tuple(saved[key]['shape'])}, model {tuple(wanted[key])}"
            )
    return out


def load_megatron_checkpoint(
    model: torch.nn.Module, directory: str | os.PathLike
) -> dict[str, Any]:
    """Load a checkpoint written by `save_megatron_checkpoint` into `model`, in place.

    Collective: every rank calls it with its own shard of the model. The checkpoint may have
    been saved at a different tensor-parallel size. Attention settings may differ from the
    saved model's (e.g. DCA applied to a RoPE checkpoint); tensor keys and shapes must match.

    Args:
        model: a Megatron-core module built like the saved one (any tensor-parallel size).
        directory: a checkpoint directory.

    Returns:
        The checkpoint's marker (format, versions, `model` description, `tensor_parallel_size`
        it was saved at, `tensors`, `files`).

    Raises:
        ValueError: bad arguments, or torch.distributed not initialised.
        CheckpointError: missing, incomplete or corrupt checkpoint, or one whose tensors do not
            fit the model (the message lists the differing tensors and model settings). These
            are found from the marker before anything is read, with the model untouched; only
            damage that keeps file sizes (caught by megatron-core's reader) is reported after
            the model may have been partly overwritten.
    """
    path = _check_call(model, directory)
    marker = read_checkpoint_info(path)
    problems = _mismatch(marker, model)
    if problems:
        ours = describe_model(model)
        fields = [
            f"{k}: checkpoint {marker['model'].get(k)!r}, model {v!r}"
            for k, v in ours.items()
            if marker["model"].get(k) != v
        ]
        detail = (f"settings that differ: {'; '.join(fields)}; " if fields else "") + (
            f"tensors that differ: {'; '.join(problems)}"
        )
        raise CheckpointError(f"checkpoint {path} does not fit the model: {detail}")
    apply_cpu_workarounds()
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is no Exception
        raise CheckpointError(
            f"checkpoint {path} could not be read: {type(e).__name__}: {e}"
        ) from e
    model.load_state_dict(state)
    return marker


__all__ = [
    "CONFIG_FILE",
    "MARKER",
    "CheckpointError",
    "describe_model",
    "load_megatron_checkpoint",
    "read_checkpoint_info",
    "save_megatron_checkpoint",
]
