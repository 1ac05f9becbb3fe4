"""Our Megatron dist checkpoints, read one layer at a time, without building the model.

A torch_dist checkpoint stores every layer's copy of a parameter in one layer-stacked tensor
(global shape [num_layers, ...]) saved in chunks (one per layer and tensor-parallel rank). The
key and slice of each state-dict tensor come from a GPTModel built on the meta device at
tensor-parallel size 1 (no memory): `sharded_state_dict()` names, for
`decoder.layers.3.mlp.linear_fc1.weight`, the stored key, the layer offset 3 and (SwiGLU) the
two halves. `SliceReader` then reads exactly those bytes with torch's distributed-checkpoint
reader (a planner that asks for sub-chunks), whatever tensor-parallel size wrote them: chunks of
several ranks are assembled by the reader, so a TP=2 checkpoint is merged on the fly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ext.convert.errors import ConversionError

__all__ = ["SliceReader", "tensor_slices"]


def tensor_slices(model: torch.nn.Module) -> dict[str, list[ShardedTensor]]:
    """For each state-dict name of `model` (built at TP=1), the stored slices making it up."""
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    out: dict[str, list[ShardedTensor]] = {}
    for name, value in sharded.items():
        pieces = [v for v in nested_values([value]) if isinstance(v, ShardedTensor)]
        if pieces:
            out[name] = pieces
    return out


class _SlicePlanner(DefaultLoadPlanner):
    """Reads requested sub-chunks of stored tensors into caller-provided buffers."""

    def __init__(self, requests: list[tuple[str, tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__()
        self.requests = requests
        self.dest = {(fqn, tuple(off)): buf for fqn, off, buf in requests}

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, off, buf in self.requests:
            md = self.metadata.state_dict_metadata[fqn]
            chunk = ChunkStorageMetadata(offsets=torch.Size(off), sizes=buf.shape)
            items += create_read_items_for_chunk_list(fqn, md, [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        idx = read_item.dest_index
        buf = self.dest[(idx.fqn, tuple(idx.offset))]
        for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths,
                                         strict=True)):
            buf = buf.narrow(dim, o, n)
        return buf

    def commit_tensor(self, read_item, tensor) -> None:
        return None


class SliceReader:
    """Slices of the tensors of one checkpoint directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        try:
            self.reader = FileSystemReader(str(self.dir))
            self.metadata = self.reader.read_metadata()
        except Exception as e:
            raise ConversionError(f"{self.dir}: checkpoint metadata (.metadata) could not be "
                                  f"read: {type(e).__name__}: {e}") from e
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}

    def read(self, name: str, pieces: list[ShardedTensor],
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """The state-dict tensor `name` assembled from its stored `pieces`."""
        first = pieces[0]
        pre = first.prepend_axis_num
        full = [0] * len(first.local_shape)
        for p in pieces:
            for d, (o, n) in enumerate(zip(p.global_offset[pre:], p.local_shape, strict=True)):
                full[d] = max(full[d], o + n)
        requests, outs = [], []
        for p in pieces:
            md = self.tensors.get(p.key)
            if md is None:
                raise ConversionError(f"{self.dir}: tensor {p.key} (for {name}) is not in the "
                                      "checkpoint")
            if tuple(md.size) != tuple(p.global_shape):
                raise ConversionError(f"{self.dir}: tensor {p.key} has shape {tuple(md.size)}, "
                                      f"the config gives {tuple(p.global_shape)}")
            buf = torch.empty((1,) * pre + tuple(p.local_shape), dtype=md.properties.dtype)
            requests.append((p.key, tuple(p.global_offset), buf))
            outs.append((p, buf))
        try:
            dcp_load({}, storage_reader=self.reader, planner=_SlicePlanner(requests),
                     no_dist=True)
        except Exception as e:
            raise ConversionError(f"{self.dir}: reading {name} failed (corrupt or truncated "
                                  f"shard file?): {type(e).__name__}: {e}") from e
        if len(outs) == 1:
            out = outs[0][1].reshape(first.local_shape)
        else:
            out = torch.empty(full, dtype=outs[0][1].dtype)
            for p, buf in outs:
                view = out
                for d, (o, n) in enumerate(zip(p.global_offset[pre:], p.local_shape,
                                               strict=True)):
                    view = view.narrow(d, o, n)
                view.copy_(buf.reshape(p.local_shape))
        return out if dtype is None else out.to(dtype)
