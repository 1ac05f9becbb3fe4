"""Reading and writing Hugging Face checkpoint directories, one tensor / one shard at a time.

`HFReader` opens `model.safetensors` or `model.safetensors.index.json` + shards and reads
tensors lazily (safetensors memory-maps; nothing else is held). Legacy `pytorch_model*.bin`
files are read with `torch.load(weights_only=True)`. Damage is reported naming the file: a
missing shard, a truncated or corrupt header, an index that points at a tensor the shard lacks.

`ShardWriter` collects tensors until a shard reaches `max_shard_bytes`, writes it (temp file +
rename) and frees it, and finally writes the index; peak memory is one shard plus what the
caller holds. `copy_side_files` copies tokenizer and generation files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_ext.convert.errors import ConversionError

__all__ = ["HFReader", "ShardWriter", "copy_side_files", "write_json", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class HFReader:
    """Lazy tensor access to an HF model directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        if not (self.dir / "config.json").is_file():
            raise ConversionError(f"{self.dir} has no config.json: not a Hugging Face model "
                                  "directory")
        self.location: dict[str, Path] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        bin_index = self.dir / "pytorch_model.bin.index.json"
        if index.is_file():
            self._from_index(index)
        elif single.is_file():
            self._scan(single)
        elif bin_index.is_file():
            self._from_index(bin_index)
        elif (self.dir / "pytorch_model.bin").is_file():
            self._scan(self.dir / "pytorch_model.bin")
        else:
            raise ConversionError(f"{self.dir} has no model.safetensors, "
                                  "model.safetensors.index.json or pytorch_model.bin")

    def _from_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index} is corrupt: {e}") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (self.dir / name).is_file():
                raise ConversionError(f"{index} lists shard {name}, which is missing")
        for name in files:
            found = set(self._scan(self.dir / name, register=False))
            for key, file in weight_map.items():
                if file == name and key not in found:
                    raise ConversionError(f"{index} maps tensor {key} to {name}, which does "
                                          "not contain it")
        self.location = {k: self.dir / v for k, v in weight_map.items()}

    def _scan(self, path: Path, register: bool = True) -> list[str]:
        if path.suffix == ".bin":
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConversionError(f"{path} could not be read: {type(e).__name__}: {e}") from e
            self._bin[path] = state
            keys = list(state)
        else:
            try:
                with safe_open(path, framework="pt") as f:
                    keys = list(f.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ConversionError(f"{path} is corrupt or truncated: {e}") from e
        if register:
            for k in keys:
                self.location[k] = path
        return keys

    def keys(self) -> list[str]:
        return sorted(self.location)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` (a fresh CPU tensor)."""
        if name not in self.location:
            raise ConversionError(f"tensor {name} is missing from {self.dir}")
        path = self.location[name]
        if path in self._bin:
            return self._bin[path][name]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConversionError(f"tensor {name} in {path} could not be read (corrupt or "
                                  f"truncated file): {e}") from e


class ShardWriter:
    """Writes `model-XXXXX-of-YYYYY.safetensors` shards and the index, streaming."""

    def __init__(self, directory: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.dir = directory
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in s for s in self.shards):
            raise ConversionError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        idx = len(self.shards)
        tmp = self.dir / f".shard-{idx:05d}.tmp"
        save_file(self.pending, str(tmp), metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, name the shards, write the index; returns the file names written."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        weight_map, names = {}, []
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f".shard-{i:05d}.tmp", self.dir / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        write_json(self.dir / "model.safetensors.index.json",
                   {"metadata": {"total_size": self.total}, "weight_map": weight_map})
        return names


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy those of `names` that exist in `src` into `dst` (temp + rename each)."""
    copied = []
    for name in names:
        if (src / name).is_file():
            tmp = dst / f".{name}.tmp"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)
            copied.append(name)
    return copied
