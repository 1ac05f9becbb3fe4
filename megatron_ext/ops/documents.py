"""Documents of packed rows: which document a token belongs to, its position and its length.

A packed row holds several documents; ``doc_ids`` [B, S] gives each token an id and a document is
a maximal run of equal consecutive ids. Every position rule of the package (RoPE, DCA chunks and
temperature, Llama-4 chunks and temperature, dynamic NTK) uses per-document positions, so these
three small functions are shared by the ops, context parallelism and the layers.
"""

from __future__ import annotations

import torch

__all__ = ["document_lengths", "document_runs"]


def document_runs(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Document index and per-document position of every token.

    Args:
        doc_ids: int [B, S]; a document is a maximal run of equal consecutive ids.

    Returns:
        (run, pos): int64 [B, S] each; ``run`` numbers the documents 0, 1, ... per row and
        ``pos`` is the 0-based position inside the token's document.
    """
    B, S = doc_ids.shape
    idx = torch.arange(S, device=doc_ids.device).expand(B, S)
    start = torch.ones(B, S, dtype=torch.bool, device=doc_ids.device)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run = start.long().cumsum(-1) - 1
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(-1).values
    return run, idx - first


def document_lengths(positions: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """Per token, max position + 1 over its document (runs of equal ids) in the row.

    Args:
        positions: int [B, S] absolute per-document positions (a document continued from an
            earlier sample keeps counting, so this is the length the batch *shows*).
        doc_ids: int [B, S] or None (one document per row).

    Returns:
        int64 [B, S].
    """
    positions = positions.long()
    if doc_ids is None:
        return (positions.max(dim=1, keepdim=True).values + 1).expand_as(positions)
    run, _ = document_runs(doc_ids)
    longest = torch.zeros_like(positions).scatter_reduce(1, run, positions, "amax")
    return torch.gather(longest, 1, run) + 1
