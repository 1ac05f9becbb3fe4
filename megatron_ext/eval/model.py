"""The model-access interface of the evaluation and its two implementations.

Everything the tasks need from a model is: its tokenizer, its resolved run config, the longest
row it accepts, logits and per-token losses of token rows, and a greedy continuation.
`EvalModel` names them. Two implementations:

- `EngineModel` (default, `--engine inference`): the inference engine's `load_model`, so every
  method it knows is reachable with `--set`, LongHeads included; greedy answers use its cached
  prefill and decode.
- `ForwardModel` (`--engine forward`): the GPTModel built with `build_gpt_model`, weights from
  `load_megatron_checkpoint`, run by full `gpt_forward` passes; greedy answers by full passes
  with the teacher-forced shortcut of generation.py. Independent of the engine's caches, which
  makes it the cross-check.

Both accept a checkpoint directory (the weights, `config.yaml` beside them or one level up), a
training run directory (`checkpoints/latest` names a step whose `model/` holds the weights) or
a directory with a `latest` pointer. `--set` overrides are applied to the stored config, which
is how DCA, LongHeads, YaRN or dynamic NTK are switched on for a model trained without them.

`max_length` is the resolved `inference.max_seq_len`: a longer evaluation is refused, naming
the override that would allow it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from megatron_ext.checkpoint import (
    CONFIG_FILE,
    MARKER,
    CheckpointError,
    load_megatron_checkpoint,
    read_checkpoint_info,
)
from megatron_ext.config import RunConfig, load_config
from megatron_ext.eval.generation import greedy_decode
from megatron_ext.eval.samples import LengthError

__all__ = ["ENGINES", "EngineModel", "EvalModel", "ForwardModel", "find_checkpoint",
           "load_eval_model"]

ENGINES = ("inference", "forward")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EvalModel(Protocol):
    """What the evaluation asks of a model."""

    tokenizer: object
    """A `tokenizers.Tokenizer`."""
    config: RunConfig
    """The resolved run config (after overrides)."""
    max_length: int
    """Longest token row the model accepts."""

    def logits(self, tokens: torch.Tensor, *, seq_len: int | None = None) -> torch.Tensor:
        """tokens int [B, S] -> logits float [B, S, V]."""
        ...

    def token_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int [B, S] -> loss of tokens[:, 1:] given their prefixes, float [B, S-1]."""
        ...

    def greedy(self, prompt: Sequence[int], n_new: int, guess: Sequence[int] = ()
               ) -> list[int]:
        """The `n_new` greedy tokens after `prompt`."""
        ...


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoint directory, run config file) for a checkpoint or run directory.

    Raises:
        CheckpointError: no such directory, not a complete checkpoint, or no config.yaml.
    """
    p = Path(path).absolute()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist; expected a checkpoint directory "
                              f"(with {MARKER}) or a run directory with a 'latest' pointer")
    if not (p / MARKER).exists() and (p / "checkpoints" / "latest").exists():
        p = p / "checkpoints"  # a training run directory
    if not (p / MARKER).exists() and (p / "latest").exists():
        ptr = p / "latest"
        p = ptr.resolve() if ptr.is_symlink() else p / ptr.read_text().strip()
    if not (p / MARKER).exists() and (p / "model" / MARKER).exists():
        p = p / "model"  # a training checkpoint: weights in model/, config.yaml beside it
    read_checkpoint_info(p)
    for cand in (p / CONFIG_FILE, p.parent / CONFIG_FILE):
        if cand.is_file():
            return p, cand
    raise CheckpointError(f"checkpoint {p} has no {CONFIG_FILE} beside it nor one level up; "
                          "cannot tell how the model was built")


def _ensure_parallel_state() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ext.dist import init_distributed

    if not dist.is_initialized():
        init_distributed(backend="gloo")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)


class ForwardModel:
    """A GPTModel run by full forward passes (`gpt_forward`), one process.

    Args:
        model: a GPTModel from `build_gpt_model` (tp = cp = 1), any device.
        config: the run config it was built from.
        tokenizer: a `tokenizers.Tokenizer`.
    """

    def __init__(self, model: torch.nn.Module, config: RunConfig, tokenizer) -> None:
        self.model = model.eval()
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = config.inference.max_seq_len
        self.device = next(model.parameters()).device

    def check_length(self, n: int, what: str) -> None:
        """Raise LengthError if `n` tokens exceed what the model accepts."""
        _check_length(n, self.max_length, what)

    def logits(self, tokens: torch.Tensor, *, seq_len: int | None = None) -> torch.Tensor:
        from megatron_ext.layers.forward import gpt_forward

        self.check_length(tokens.shape[-1], "logits")
        with torch.no_grad():
            out = gpt_forward(self.model, tokens.to(self.device), seq_len=seq_len)
        return out.float()

    def token_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        from megatron_ext.layers.forward import gpt_forward

        self.check_length(tokens.shape[-1], "perplexity window")
        tokens = tokens.to(self.device)
        with torch.no_grad():
            out = gpt_forward(self.model, tokens[:, :-1], labels=tokens[:, 1:])
        return out.float()

    def greedy(self, prompt: Sequence[int], n_new: int, guess: Sequence[int] = ()
               ) -> list[int]:
        self.check_length(len(prompt) + n_new, "prompt + answer")
        out, _ = greedy_decode(self.logits, prompt, n_new, guess)
        return out


def _check_length(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise LengthError(f"{what}: {n} tokens is more than this model holds (inference."
                          f"max_seq_len={limit}); allow it with --set inference.max_seq_len={n}")


class EngineModel:
    """The inference engine's `InferenceModel` behind the `EvalModel` interface."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.config = inner.config
        self.tokenizer = inner.tokenizer
        self.max_length = inner.config.inference.max_seq_len
        self.device = inner.device

    def logits(self, tokens: torch.Tensor, *, seq_len: int | None = None) -> torch.Tensor:
        _check_length(tokens.shape[-1], self.max_length, "logits")
        return self.inner.logits(tokens, seq_len=seq_len).float()

    def token_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        logits = self.logits(tokens[:, :-1])
        target = tokens[:, 1:].to(logits.device)
        return F.cross_entropy(logits.transpose(1, 2), target, reduction="none")

    def greedy(self, prompt: Sequence[int], n_new: int, guess: Sequence[int] = ()
               ) -> list[int]:
        _check_length(len(prompt) + n_new, self.max_length, "prompt + answer")
        out = self.inner.generate([list(prompt)], max_new_tokens=n_new, temperature=0.0,
                                  stop_tokens=[])
        return list(out[0])


def load_eval_model(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    device: str | None = None,
    dtype: str = "fp32",
    engine: str = "inference",
) -> EngineModel | ForwardModel:
    """Open a checkpoint for evaluation.

    Args:
        path: a checkpoint, training run or `latest`-pointer directory (module docstring).
        overrides: `section.key=value` strings applied to the stored run config.
        device: "cpu", "cuda", ...; default CUDA when available.
        dtype: "fp32", "bf16" or "fp16".
        engine: "inference" (the inference engine) or "forward" (full gpt_forward passes).

    Raises:
        CheckpointError: missing, incomplete or mismatched checkpoint.
        ConfigError: a bad override.
        ValueError: an unknown engine, or LongHeads asked of the forward engine.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; expected one of {ENGINES}")
    ckpt, config_file = find_checkpoint(path)
    if engine == "inference":
        from megatron_ext.inference import load_model

        return EngineModel(load_model(ckpt, list(overrides), device=device, dtype=dtype))
    cfg = load_config(config_file, list(overrides))
    if cfg.attention.variant == "longheads":
        raise ValueError("attention.variant='longheads' has no training layer for the forward "
                         "engine; use --engine inference")
    vocab = read_checkpoint_info(ckpt)["model"].get("vocab_size") or cfg.model.vocab_size
    if not vocab:
        raise CheckpointError(f"{ckpt}: the checkpoint records no vocab_size")
    _ensure_parallel_state()
    from megatron_ext.data.tokenizer import load_tokenizer
    from megatron_ext.specs import build_gpt_model

    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=int(vocab),
                            perform_initialization=False)
    load_megatron_checkpoint(model, ckpt)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device=dev, dtype=_DTYPES[dtype])
    return ForwardModel(model, cfg, load_tokenizer(cfg.data.tokenizer))
