"""What a run shows and records: the world layout (preflight table, world.json), FLOPs per
token and the MFU estimate (formula in docs/training.md), and the per-step log line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.config import ModelConfig

# dense bf16 / fp16 tensor-core peak (TFLOP/s) of common accelerators, by name fragment
_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                ("A10G", 125.0), ("V100", 125.0))


def flops_per_token(model: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the weights plus 6 L S d for causal attention.

    N counts every parameter (embedding included); the attention term is QK^T and AV
    (2 x 2 S d multiply-adds per token and layer), halved by the causal mask, times 3 for
    forward + backward. See docs/training.md.
    """
    return 6.0 * n_params + 6.0 * model.num_layers * seq_len * model.hidden_size


def peak_flops(override_tflops: float | None, device: torch.device) -> float | None:
    """Peak FLOP/s of one device: the config's value, else a known GPU, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12
    return None


def world_layout() -> list[dict[str, Any]]:
    """Per global rank: its TP / CP / DP ranks and the global ranks of each of its groups.

    Collective: every rank calls it after Megatron's parallel state is initialised.
    """
    from megatron.core import parallel_state as ps

    mine = {
        "rank": dist.get_rank(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "cp_rank": ps.get_context_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "tp_group": ps.get_tensor_model_parallel_global_ranks() if hasattr(
            ps, "get_tensor_model_parallel_global_ranks") else dist.get_process_group_ranks(
            ps.get_tensor_model_parallel_group()),
        "cp_group": ps.get_context_parallel_global_ranks(),
        "dp_group": dist.get_process_group_ranks(ps.get_data_parallel_group()),
        "dp_cp_group": dist.get_process_group_ranks(
            ps.get_data_parallel_group(with_context_parallel=True)),
        "host": os.uname().nodename,
    }
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    return rows


def layout_table(rows: list[dict[str, Any]]):
    """A rich Table: one line per rank with its position and group members."""
    from rich.table import Table

    table = Table(title="world layout (preflight)")
    for col in ("rank", "host", "tp", "cp", "dp", "TP group", "CP group", "DP group",
                "ZeRO / grad group (DP x CP)"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["rank"]), r["host"], str(r["tp_rank"]), str(r["cp_rank"]),
                      str(r["dp_rank"]), str(list(r["tp_group"])), str(list(r["cp_group"])),
                      str(list(r["dp_group"])), str(list(r["dp_cp_group"])))
    return table


def write_json(path: Path, data: Any) -> None:
    """JSON written atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["flops_per_token", "layout_table", "peak_flops", "world_layout", "write_json"]
