"""``load_model``: a checkpoint (or a run directory) -> ``InferenceModel``, with overrides.

Accepted paths:

- a checkpoint directory written by ``megatron_ext.checkpoint.save_megatron_checkpoint`` (its
  ``megatron_ext.json`` marker), with the run's ``config.yaml`` beside the weights or in the
  directory above;
- a run directory with a ``latest`` pointer (a file holding the step directory's name, or a
  symbolic link to it);
- a Hugging Face directory (``config.json`` without our marker): handed to the loader
  converted on the fly by the conversion package (``megatron_ext.convert``).

Overrides are ``--set``-style keys (``{"attention.variant": "dca", "attention.dca":
{"chunk_size": 768, "local_size": 128}}``) applied to the stored run config before the model is
built, which is how a training-free method is switched on for a model trained without it: DCA,
LongHeads, YaRN / dynamic-NTK RoPE scaling, or the Llama-4 NoPE temperature of a hybrid. The
weights do not change; a LongHeads run builds the plain RoPE model and swaps attention at
inference. Any override that changes a weight's shape is refused by the checkpoint loader,
naming the tensors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_ext.checkpoint import (
    CONFIG_FILE,
    MARKER,
    CheckpointError,
    load_megatron_checkpoint,
    read_checkpoint_info,
)
from megatron_ext.config import RunConfig, load_config
from megatron_ext.inference.model import InferenceModel

__all__ = ["ensure_megatron", "from_model", "load_model", "resolve_checkpoint"]

_DTYPES = ("fp32", "bf16", "fp16")
def _latest(run_dir: Path) -> Path:
    ptr = run_dir / "latest"
    target = ptr.resolve() if ptr.is_symlink() else run_dir / ptr.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{ptr} points at {target}, which does not exist")
    return target


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoint directory, its run config file) for a checkpoint or run directory.

    Raises:
        CheckpointError: missing path, incomplete checkpoint, or no config.yaml found.
    """
    p = Path(path).absolute()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; expected a checkpoint directory "
                              f"(with {MARKER}) or a run directory with a 'latest' pointer")
    ckpt = p
    if not (p / MARKER).exists():
        for runs in (p, p / "checkpoints"):  # a run directory, or the trainer's out_dir
            if (runs / "latest").exists():
                ckpt = _latest(runs)
                break
        if (ckpt / "model" / MARKER).exists():  # a training step: weights under model/
            ckpt = ckpt / "model"
    read_checkpoint_info(ckpt)  # marker present and every file it lists intact
    for cand in (ckpt / CONFIG_FILE, ckpt.parent / CONFIG_FILE):
        if cand.is_file():
            return ckpt, cand
    raise CheckpointError(f"checkpoint {ckpt} has no {CONFIG_FILE} beside it nor in "
                          f"{ckpt.parent}; cannot tell how the model was built")


def _override_strings(overrides: Mapping[str, Any] | Iterable[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        out = []
        for key, value in overrides.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
            out.append(f"{key}={text.removesuffix('...').strip()}")
        return out
    if isinstance(overrides, str):
        raise ValueError(f"overrides={overrides!r}; expected a mapping or a list of "
                         "'section.key=value' strings")
    return list(overrides)


def _check_cp_size(context_parallel: int) -> None:
    if isinstance(context_parallel, bool) or not isinstance(context_parallel, int) or \
            context_parallel < 1:
        raise ValueError(f"context_parallel={context_parallel!r}; expected an int >= 1")


def ensure_megatron(context_parallel: int = 1) -> None:
    """A process group and Megatron parallel state with TP = 1 and CP = ``context_parallel``.

    One process gets a gloo group of its own; context parallelism needs a launcher (torchrun,
    srun, mpirun) with a multiple of ``context_parallel`` ranks (several CP groups each run the
    same generation). With ``context_parallel`` > 1 an existing parallel state must have that
    CP size; a model at CP = 1 uses no group, so any existing state serves it.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ext.dist import get_world_size, init_distributed

    _check_cp_size(context_parallel)
    if not dist.is_initialized():
        init_distributed(backend="gloo" if context_parallel == 1 else "auto")
    world = get_world_size()
    if world % context_parallel:
        raise ValueError(
            f"context_parallel={context_parallel} needs a multiple of {context_parallel} ranks; "
            f"this job has {world} (launch with torchrun --nproc-per-node {context_parallel})")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1,
                                     context_parallel_size=context_parallel)
    elif context_parallel > 1 and ps.get_context_parallel_world_size() != context_parallel:
        raise ValueError(
            f"context_parallel={context_parallel}, but Megatron's parallel state is already "
            f"initialised with context_parallel_size={ps.get_context_parallel_world_size()}; "
            "destroy it (parallel_state.destroy_model_parallel()) or pass that size")


def build_attention(cfg: RunConfig):
    """The attention section the GPTModel is built with (LongHeads runs on a RoPE model)."""
    att = cfg.attention
    return dataclasses.replace(att, variant="rope") if att.variant == "longheads" else att


def from_model(model: torch.nn.Module, cfg: RunConfig, tokenizer=None) -> InferenceModel:
    """Wrap an in-memory GPTModel (built from ``cfg``) for inference."""
    return InferenceModel(model, cfg, tokenizer)


def inference_config(cfg: RunConfig, context_parallel: int) -> RunConfig:
    """``cfg`` with the context-parallel size inference runs at (TP = 1); refuses a method that
    has no context-parallel prefill before anything is built."""
    _check_cp_size(context_parallel)
    if context_parallel > 1:
        from megatron_ext.inference.cp_prefill import check_cp_prefill

        check_cp_prefill(cfg.attention.variant, cfg.parallel.cp_layout, context_parallel)
    par = dataclasses.replace(cfg.parallel, tensor_parallel_size=1,
                              context_parallel_size=context_parallel)
    return dataclasses.replace(cfg, parallel=par)


def build_inference_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    """The GPTModel inference runs (uninitialised weights), context parallel when
    ``cfg.parallel.context_parallel_size`` > 1 (with ``parallel.cp_algorithm``)."""
    from megatron_ext.specs import build_gpt_model

    par = cfg.parallel
    return build_gpt_model(cfg.model, build_attention(cfg), vocab_size=vocab_size,
                           perform_initialization=False, cp=par.context_parallel_size,
                           cp_algorithm=par.cp_algorithm)


def load_model(
    path: str | os.PathLike,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str = "fp32",
    tokenizer: Any = None,
    context_parallel: int = 1,
) -> InferenceModel:
    """Load a checkpoint for inference.

    Args:
        path: a checkpoint directory, a run directory with ``latest``, or a Hugging Face
            directory (converted on the fly).
        overrides: ``{"section.key": value}`` or ``["section.key=value", ...]`` applied to the
            stored run config.
        device: "cpu", "cuda", ...; default CUDA when available.
        dtype: "fp32", "bf16" or "fp16" (weights are loaded in fp32, then cast).
        tokenizer: a ``tokenizers.Tokenizer``; default the run's ``data.tokenizer``.
        context_parallel: ranks that share each prompt's prefill (every rank of a launcher job
            calls ``load_model`` and then ``generate`` with the same arguments); the split and
            the plan are ``parallel.cp_layout`` and ``parallel.cp_algorithm``. See
            docs/inference.md, "Context-parallel prefill".

    Raises:
        CheckpointError: missing or incomplete checkpoint, or weights that do not fit.
        ConfigError: an unknown key, value or method in the overrides.
        ValueError: a method without context-parallel prefill, or a job whose size does not
            fit ``context_parallel``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {_DTYPES}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    sets = _override_strings(overrides)
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / MARKER).exists():
        from megatron_ext.convert.inference_hook import hf_inference_loader

        return hf_inference_loader(p, overrides=sets, device=device, dtype=dtype,
                                   context_parallel=context_parallel)
    ckpt, config_file = resolve_checkpoint(p)
    cfg = inference_config(load_config(config_file, sets), context_parallel)
    marker = read_checkpoint_info(ckpt)
    vocab = marker["model"].get("vocab_size") or cfg.model.vocab_size
    if not vocab:
        raise CheckpointError(f"{ckpt}: the marker records no vocab_size")
    ensure_megatron(context_parallel)
    model = build_inference_model(cfg, int(vocab))
    load_megatron_checkpoint(model, ckpt)
    model = model.to(device=device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                                           "fp16": torch.float16}[dtype])
    if tokenizer is None:
        from megatron_ext.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
    return InferenceModel(model, cfg, tokenizer)
