"""Cross-entropy over the vocabulary in token chunks, never holding full [S, vocab] fp32 logits.

The model's own loss (`GPTModel.compute_language_model_loss`) materialises the logits of every
token, [S, B, V/TP], and the cross-entropy keeps fp32 copies of them for backward: at 64K tokens
and a 128K vocabulary that is 32 GiB per copy. Here the final hidden states [S, B, H] are cut
into chunks of `chunk_size` tokens; each chunk's logits are computed in fp32, reduced to a
per-token loss and dropped, and recomputed in backward (`torch.utils.checkpoint`). Peak memory
for the loss is one chunk's logits, [chunk, V/TP], whatever S is. Under tensor parallelism the
vocabulary stays sharded and Megatron's `vocab_parallel_cross_entropy` combines the shards.

`enable_chunked_loss(model, chunk_size)` switches a GPTModel to it: calls with labels return the
same per-token loss [B, S] as before (to fp32 rounding), calls without labels still return
logits. The maths and the memory figures are in docs/training.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                tp: int) -> torch.Tensor:
    """Per-token loss of one chunk: hidden [N, H], weight [V/TP, H], labels [N] -> [N] (fp32, or
    fp64 for fp64 inputs)."""
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if tp > 1:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="none")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_size: int,
    tp_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy of `hidden @ weight.T` against `labels`, `chunk_size` tokens at a
    time.

    Args:
        hidden: [..., H] final hidden states (any leading shape, e.g. [S, B, H]).
        weight: [V, H] output projection, or this rank's vocabulary shard [V/TP, H].
        labels: int [...] targets in [0, V) (mask ignored tokens after, not with -100).
        chunk_size: tokens per chunk (>= 1).
        tp_group: the tensor-parallel group when `weight` is a vocabulary shard.

    Returns:
        loss with the leading shape of `labels`, in fp32 (fp64 for fp64 inputs).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected >= 1")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden.shape={tuple(hidden.shape)} and labels.shape="
                         f"{tuple(labels.shape)}: expected hidden [..., H] over labels [...]")
    tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    if tp > 1:  # forward: copy, backward: sum the input gradient over the vocabulary shards
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    parts = []
    for start in range(0, flat_y.numel(), chunk_size):
        h, y = flat_h[start:start + chunk_size], flat_y[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            parts.append(checkpoint(_chunk_loss, h, weight, y, tp, use_reentrant=False))
        else:
            parts.append(_chunk_loss(h, weight, y, tp))
    return torch.cat(parts).reshape(labels.shape)


class _ChunkedLossMixin:
    """GPTModel whose loss (calls with labels) is `chunked_cross_entropy` of the final hidden
    states; everything else is the model's own code."""

    loss_chunk_size: int

    def _postprocess(self, hidden_states, *, labels=None, inference_context=None, **kw):
        plain = (labels is None or inference_context is not None or not self.post_process
                 or self.config.mtp_num_layers)
        if plain:
            return super()._postprocess(hidden_states, labels=labels,
                                        inference_context=inference_context, **kw)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        tp_group = self.output_layer.tp_group if self.config.tensor_model_parallel_size > 1 \
            else None
        loss = chunked_cross_entropy(hidden_states, weight, labels.transpose(0, 1),
                                     chunk_size=self.loss_chunk_size, tp_group=tp_group)
        return loss.transpose(0, 1).contiguous()  # [S, B] -> [B, S], as the model's own loss


def enable_chunked_loss(model: torch.nn.Module, chunk_size: int) -> torch.nn.Module:
    """Make `model` (a GPTModel) compute its loss with `chunked_cross_entropy`, in place.

    The instance's class becomes a subclass of its own class that overrides only the loss
    branch of `_postprocess`; parameters, state dict keys and checkpoints are unchanged.
    """
    if chunk_size < 1:
        raise ValueError(f"train.loss_chunk_size={chunk_size}; expected >= 1 (0 keeps the "
                         "model's own loss, so do not call this)")
    base = type(model)
    if not issubclass(base, _ChunkedLossMixin):
        model.__class__ = type(f"ChunkedLoss{base.__name__}", (_ChunkedLossMixin, base), {})
    model.loss_chunk_size = chunk_size
    return model


__all__ = ["chunked_cross_entropy", "enable_chunked_loss"]
