"""The model-access interface of the evaluation, and its implementation on a checkpoint.

Everything the tasks need from a model is four things: its tokenizer, its resolved run config,
logits of token rows, and the per-token loss of token rows. `EvalModel` names them, plus the
greedy continuation built on the logits (generation.py). `load_eval_model` opens a checkpoint
directory (the weights with `config.yaml` beside them or one level up, or a run directory whose
`latest` names one), applies `--set` overrides to the stored config (which is how DCA, YaRN or
dynamic NTK are switched on for a model trained without them), builds the GPTModel with
`build_gpt_model` and loads the weights with `load_megatron_checkpoint`.

`max_length` is `model.max_position_embeddings` of the resolved config: asking for a longer
evaluation is refused, naming the override that would allow it.
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

__all__ = ["EvalModel", "ForwardModel", "find_checkpoint", "load_eval_model"]

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
    if not (p / MARKER).exists() and (p / "latest").exists():
        ptr = p / "latest"
        p = ptr.resolve() if ptr.is_symlink() else p / ptr.read_text().strip()
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
        self.max_length = config.model.max_position_embeddings
        self.device = next(model.parameters()).device

    def check_length(self, n: int, what: str) -> None:
        """Raise LengthError if `n` tokens exceed what the model accepts."""
        if n > self.max_length:
            raise LengthError(
                f"{what}: {n} tokens is more than this model holds (model."
                f"max_position_embeddings={self.max_length}); allow it with --set "
                f"model.max_position_embeddings={n} if the method extrapolates")

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


def load_eval_model(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    device: str | None = None,
    dtype: str = "fp32",
) -> ForwardModel:
    """Open a checkpoint for evaluation.

    Args:
        path: a checkpoint directory or a run directory with a `latest` pointer.
        overrides: `section.key=value` strings applied to the stored run config.
        device: "cpu", "cuda", ...; default CUDA when available.
        dtype: "fp32", "bf16" or "fp16".

    Raises:
        CheckpointError: missing, incomplete or mismatched checkpoint.
        ConfigError: a bad override.
        ValueError: a method this path cannot run (LongHeads needs the inference engine).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
    ckpt, config_file = find_checkpoint(path)
    cfg = load_config(config_file, list(overrides))
    if cfg.attention.variant == "longheads":
        raise ValueError("attention.variant='longheads' runs only through the inference engine "
                         "(megatron_ext.inference), which this installation lacks")
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
