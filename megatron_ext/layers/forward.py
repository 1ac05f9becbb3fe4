"""`gpt_forward`: the one way to run a megatron_ext GPTModel on a batch of token rows.

Training, evaluation, conversion checks and inference all call the model through this function,
so how positions, document boundaries and the context-parallel layout reach the core attention
is decided in one place: a `SequenceInfo` in GPTModel's `packed_seq_params` slot, which
Megatron forwards untouched to the core attention.
"""

from __future__ import annotations

import torch

from megatron_ext.layers.core_attention import SequenceInfo
from megatron_ext.parallel import CPLayout

__all__ = ["gpt_forward"]


def gpt_forward(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    seq_len: int | None = None,
    cp_layout: CPLayout | None = None,
) -> torch.Tensor:
    """Run a GPTModel built by `megatron_ext.specs.build_gpt_model` on token rows.

    Args:
        tokens: int [B, S] token ids (this rank's shard under context parallelism).
        positions: int [B, S] absolute per-document positions; None = 0..S-1 in every row.
            Under context parallelism the shard's positions, -1 on padding slots.
        doc_ids: int [B, S] document ids of packed rows (equal id = same document); None = one
            document per row. Ignored when the model's `attention.mask_documents` is off.
        labels: int [B, S] targets; when given the model returns the per-token loss [B, S].
        seq_len: fixed length for length-dependent rules (dynamic NTK, DCA temperature);
            None = what the batch shows.
        cp_layout: the `CPLayout` of the global batch when the model runs context parallel
            (`megatron_ext.parallel.batch.cp_shard_batch` returns it).

    Returns:
        logits [B, S, vocab] (vocab-parallel shard under tensor parallelism), or the per-token
        loss [B, S] when `labels` is given.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens.shape={tuple(tokens.shape)}; expected [B, S]")
    B, S = tokens.shape
    if positions is None:
        positions = torch.arange(S, device=tokens.device).expand(B, S)
    if positions.shape != (B, S):
        raise ValueError(f"positions.shape={tuple(positions.shape)}; expected {(B, S)}")
    if doc_ids is not None and doc_ids.shape != (B, S):
        raise ValueError(f"doc_ids.shape={tuple(doc_ids.shape)}; expected {(B, S)}")
    info = SequenceInfo(positions=positions, doc_ids=doc_ids, seq_len=seq_len, cp_layout=cp_layout)
    return model(tokens, positions.clamp(min=0), None, labels=labels, packed_seq_params=info)
