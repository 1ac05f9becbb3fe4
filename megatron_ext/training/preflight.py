"""Every check that can refuse a run, done before the run writes a single file.

`check_config` covers what the config alone decides (world and parallel sizes, sequence
length against context parallelism and against windows / chunks, dtype, the inference-only
method); `check_out_dir` decides between a new run, a resume and an overwrite; `check_vocab`
compares the model's vocabulary with the tokenizer's. Each error is a `ConfigError` naming the
config key, its value and what would be valid.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_ext.config import ConfigError, RunConfig


def cp_multiple(cfg: RunConfig) -> int:
    """Sequence lengths must be multiples of this under the configured CP layout."""
    cp = cfg.parallel.context_parallel_size
    return 2 * cp if cfg.parallel.cp_layout == "zigzag" and cp > 1 else cp


def _check_parallel(cfg: RunConfig, world_size: int) -> None:
    p, m = cfg.parallel, cfg.model
    tp, cp = p.tensor_parallel_size, p.context_parallel_size
    if world_size % (tp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor_parallel_size={tp} x "
            f"parallel.context_parallel_size={cp}; launch a multiple of {tp * cp} ranks")
    seq = cfg.data.seq_length
    mult = cp_multiple(cfg)
    if seq % mult:
        lo = max(mult, seq // mult * mult)
        raise ConfigError(
            f"parallel.context_parallel_size={cp} ({p.cp_layout} layout) splits each sequence "
            f"into {mult} equal slices, which data.seq_length={seq} does not divide; use "
            f"{lo} or {lo + mult}")
    if cp > 1 and p.cp_algorithm == "a2a":
        heads = m.num_attention_heads // tp
        groups = (m.num_query_groups or m.num_attention_heads) // tp
        if heads % cp or groups % cp:
            raise ConfigError(
                f"parallel.cp_algorithm='a2a' scatters attention heads over the "
                f"{cp} context-parallel ranks, but each tensor-parallel rank has {heads} query "
                f"heads and {groups} KV heads, not both divisible by {cp}; use "
                "parallel.cp_algorithm='ring' or 'allgather'")


def _check_attention(cfg: RunConfig) -> None:
    a, seq = cfg.attention, cfg.data.seq_length
    if a.variant == "longheads":
        raise ConfigError("attention.variant='longheads' is inference-only (chunk retrieval "
                          "has no training layer); train with 'rope' and use LongHeads at "
                          "inference")
    if a.variant == "hybrid":
        assert a.hybrid is not None
        types = a.hybrid.resolve(cfg.model.num_layers)
        if "rope_swa" in types and a.hybrid.window >= seq:
            raise ConfigError(
                f"attention.hybrid.window={a.hybrid.window} >= data.seq_length={seq}: every "
                "query would see its whole prefix, so the sliding-window layers would be full "
                f"attention; use a window below {seq} (or variant 'rope')")
        if "rope_chunked" in types and a.hybrid.chunk >= seq:
            raise ConfigError(
                f"attention.hybrid.chunk={a.hybrid.chunk} >= data.seq_length={seq}: one chunk "
                "covers the whole sequence, so the chunked layers would be full attention; use "
                f"a chunk below {seq} (or variant 'rope')")
    if a.variant == "dca":
        assert a.dca is not None
        if a.dca.chunk_size >= seq:
            raise ConfigError(
                f"attention.dca.chunk_size={a.dca.chunk_size} >= data.seq_length={seq}: the "
                "whole sequence is one chunk, so DCA would be plain RoPE attention; use a "
                f"chunk_size below {seq} (or variant 'rope')")


def _check_dtype(cfg: RunConfig) -> None:
    if cfg.train.dtype != "fp16":
        return
    if not cfg.deepspeed.enabled:
        raise ConfigError("train.dtype='fp16' needs dynamic loss scaling, which the DeepSpeed "
                          "path provides: set deepspeed.enabled=true, or use bf16 / fp32")
    if not torch.cuda.is_available():
        raise ConfigError("train.dtype='fp16' needs a CUDA device; on CPU use fp32")


def check_config(cfg: RunConfig, world_size: int) -> None:
    """Refuse a config that cannot run as asked (ConfigError naming the key)."""
    _check_parallel(cfg, world_size)
    _check_attention(cfg)
    _check_dtype(cfg)
    t = cfg.train
    if t.seq_warmup_start is not None and t.seq_warmup_start > cfg.data.seq_length:
        raise ConfigError(f"train.seq_warmup_start={t.seq_warmup_start} > data.seq_length="
                          f"{cfg.data.seq_length}; the warm-up grows towards data.seq_length")


def check_vocab(cfg: RunConfig, tokenizer_vocab: int) -> int:
    """The model's vocabulary (model.vocab_size or the tokenizer's), checked against both."""
    vocab = cfg.model.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer_vocab}); token ids up to {tokenizer_vocab - 1} would "
                          f"index past the embedding. Use >= {tokenizer_vocab} or leave it unset")
    tp = cfg.parallel.tensor_parallel_size
    if vocab % tp:
        raise ConfigError(f"model.vocab_size={vocab} is not divisible by "
                          f"parallel.tensor_parallel_size={tp}")
    return vocab


def check_out_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> str:
    """'new', 'resume' or 'overwrite' for `train.out_dir`, or a ConfigError.

    A new run needs a missing or empty directory; `--resume` needs a checkpoint in it;
    `--overwrite` clears it (only once every other check has passed).
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train.out_dir={str(out_dir)!r} exists and is not a directory")
    non_empty = path.is_dir() and any(path.iterdir())
    if resume:
        if not (path / "checkpoints" / "latest").is_file():
            raise ConfigError(f"--resume: train.out_dir={str(out_dir)!r} has no checkpoint "
                              "(checkpoints/latest; none was saved yet?); start it again with "
                              "--overwrite, or without --resume in an empty train.out_dir")
        return "resume"
    if non_empty:
        if overwrite:
            return "overwrite"
        raise ConfigError(f"train.out_dir={str(out_dir)!r} is not empty (an earlier run?); pass "
                          "--resume to continue it, --overwrite to replace it, or choose another "
                          "train.out_dir")
    return "new"


__all__ = ["check_config", "check_out_dir", "check_vocab", "cp_multiple"]
