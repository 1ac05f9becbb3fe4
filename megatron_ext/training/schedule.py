"""Step -> learning rate and step -> sequence length: pure functions of the step number.

Both schedules depend on nothing but the step, so resuming at step k needs no saved scheduler
state beyond k (the DeepSpeed path wraps `lr_at` in a `LambdaLR`, whose state is its step).
"""

from __future__ import annotations

import math

from megatron_ext.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps.

    Step s (0-based) of the warm-up uses lr * (s + 1) / warmup_steps, so step 0 already moves.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * frac))


def seq_length_at(step: int, cfg: TrainConfig, full: int, multiple: int = 1) -> int:
    """Training length at `step` under the optional sequence-length warm-up.

    Grows linearly from `cfg.seq_warmup_start` at step 0 to `full` at `cfg.seq_warmup_steps`,
    rounded down to a multiple of `multiple` (what context parallelism needs) and never below
    it. Without a warm-up, `full`.
    """
    if cfg.seq_warmup_start is None or step >= cfg.seq_warmup_steps:
        return full
    start = min(cfg.seq_warmup_start, full)
    length = start + (full - start) * step // cfg.seq_warmup_steps
    return max(multiple, length // multiple * multiple)


__all__ = ["lr_at", "seq_length_at"]
