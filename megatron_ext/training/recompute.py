"""Activation checkpointing as config: recompute whole layers or only the core attention.

`apply_activation_checkpointing(model, "full")` wraps every transformer layer of a GPTModel in
`torch.utils.checkpoint` (non-reentrant): only layer inputs are kept, everything inside is
recomputed in backward. `"selective"` wraps only each layer's core attention (the part whose
activations grow with the sequence). Megatron's own recompute goes through its CUDA RNG
tracker, which CPU runs do not have; torch's checkpoint restores the CPU and CUDA RNG states
itself, so dropout masks are the same in the recompute on both devices.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _wrap(module: torch.nn.Module) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> int:
    """Recompute per `mode` ('none', 'selective' or 'full'); returns how many modules."""
    if mode == "none":
        return 0
    layers = list(model.decoder.layers)
    if mode == "full":
        targets = layers
    elif mode == "selective":
        targets = [layer.self_attention.core_attention for layer in layers]
    else:
        raise ValueError(f"train.activation_checkpointing={mode!r}; expected 'none', "
                         "'selective' or 'full'")
    for module in targets:
        _wrap(module)
    return len(targets)


__all__ = ["apply_activation_checkpointing"]
