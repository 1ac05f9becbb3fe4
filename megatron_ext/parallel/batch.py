"""Give each context-parallel rank its part of a packed training batch.

`cp_shard_batch` turns a global batch (tokens, labels, positions, doc_ids, all [B, S]) into this
rank's local tokens / labels / positions plus the `CPLayout` every rank shares. The layout's
positions are replaced by the batch's own absolute per-document positions (a document continued
from an earlier sample keeps counting), and its document lengths by max position + 1 of the
document, so position rules (DCA chunks and temperature, Llama-4 chunks and temperature) see
exactly what a single process sees. Padding slots (odd lengths, short documents) get label -100
and are never visible as keys.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.documents import document_lengths
from megatron_ext.parallel.sharding import CPLayout, make_layout, shard_tensor

IGNORE_INDEX = -100


def batch_layout(
    kind: str, world_size: int, positions: torch.Tensor, doc_ids: torch.Tensor | None
) -> CPLayout:
    """The CPLayout of a packed batch, carrying the batch's own positions and lengths."""
    B, S = positions.shape
    lay = make_layout(kind, S, world_size, doc_ids=doc_ids)
    index = lay.index  # [P, Bl, L], -1 = padding
    if index.shape[1] == 1 and B > 1:  # shared layout (no doc_ids): rows may differ
        index = index.expand(-1, B, -1)
    real = index >= 0
    safe = index.clamp(min=0)
    pos = positions.cpu().long()
    lengths = document_lengths(pos, None if doc_ids is None else doc_ids.cpu())
    gathered_pos = torch.stack([torch.gather(pos, 1, safe[r]) for r in range(world_size)])
    gathered_len = torch.stack([torch.gather(lengths, 1, safe[r]) for r in range(world_size)])
    doc = lay.doc_ids.expand(-1, B, -1) if lay.doc_ids.shape[1] == 1 and B > 1 else lay.doc_ids
    return CPLayout(lay.kind, world_size, S, index,
                    torch.where(real, gathered_pos, -1), doc,
                    torch.where(real, gathered_len, 0))


def cp_shard_batch(
    batch: dict[str, torch.Tensor], *, layout: str, world_size: int, rank: int,
    mask_documents: bool = True, pad_token: int = 0,
) -> tuple[dict[str, torch.Tensor], CPLayout]:
    """This rank's tokens / labels / positions of a global packed batch, and the shared layout.

    Args:
        batch: tokens, labels, positions, doc_ids, each [B, S] (as from the data module).
        layout: "contiguous" or "zigzag".
        world_size, rank: the context-parallel group's size and this rank's index in it.
        mask_documents: keep documents apart (else one stream per row, positions 0..S-1).
        pad_token: token id of padding slots.

    Returns:
        ({"tokens", "labels", "positions"} each [B, L], layout).
    """
    tokens, labels = batch["tokens"], batch["labels"]
    B, S = tokens.shape
    if mask_documents:
        positions, doc_ids = batch["positions"], batch["doc_ids"]
    else:
        positions, doc_ids = torch.arange(S).expand(B, S), None
    lay = batch_layout(layout, world_size, positions, doc_ids)
    local = {
        "tokens": shard_tensor(tokens, lay, rank, dim=1, pad_value=pad_token),
        "labels": shard_tensor(labels, lay, rank, dim=1, pad_value=IGNORE_INDEX),
        "positions": lay.positions[rank].expand(B, -1).clone(),
    }
    return local, lay


__all__ = ["batch_layout", "cp_shard_batch"]
