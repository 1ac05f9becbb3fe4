"""Tokenize documents and pack them into fixed-length training sequences.

Packing keeps document boundaries: every sample carries, per token, the document it belongs to
(`doc_ids`, numbered from 0 inside the sample, -1 for padding) and its position *inside that
document* (`positions`, continuing across sample boundaries when a document is split), so
attention can refuse to cross documents and position-dependent methods (RoPE, DCA, LongHeads,
Llama-4 temperature) see per-document positions (../shared/METHODS.md section 0).

Layout: documents (each followed by `<|endoftext|>`) are concatenated in a seeded order into one
stream, cut into consecutive blocks of `seq_length` tokens. `labels[i]` is the next token of the
stream when it belongs to the same document, else -100 (no loss across a boundary, none on
padding). The last block is padded with `pad_id` (doc_id -1, label -100), so no token is lost;
no token is repeated. Everything is deterministic given the seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedDoc:
    """Token ids of one document (EOT included when requested)."""

    doc_id: str
    ids: np.ndarray  # [n] int32


def tokenize_documents(
    texts: Sequence[tuple[str, str]],
    tokenizer,  # tokenizers.Tokenizer
    *,
    eot_id: int | None,
    progress: bool = True,
    piece_chars: int = 200_000,
) -> list[TokenizedDoc]:
    """Tokenize (doc_id, text) pairs, appending `eot_id` to each document when not None.

    Long texts are encoded in `piece_chars` pieces split at newlines (so the byte-level BPE never
    sees a pre-token that spans pieces), with a progress bar over characters.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    total = sum(len(t) for _, t in texts)
    out: list[TokenizedDoc] = []
    columns = (
        TextColumn("tokenizing"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("tokenize", total=total)
        for doc_id, text in texts:
            pieces = _split_text(text, piece_chars)
            encoded = tokenizer.encode_batch(pieces) if pieces else []
            ids = [i for enc in encoded for i in enc.ids]
            if eot_id is not None:
                ids.append(eot_id)
            out.append(TokenizedDoc(doc_id, np.asarray(ids, dtype=np.int32)))
            bar.advance(task, len(text))
    return out


def _split_text(text: str, piece_chars: int) -> list[str]:
    """Cut `text` into pieces of about `piece_chars`, each ending just after a newline."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + piece_chars, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        pieces.append(text[start:end])
        start = end
    return pieces


@dataclass(frozen=True)
class PackedSequences:
    """Fixed-length packed samples as int64 arrays of shape [num_samples, seq_length]."""

    tokens: np.ndarray
    labels: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    doc_order: tuple[str, ...]
    """Document ids in stream order (what the seed decided)."""
    num_real_tokens: int
    """Tokens that come from documents (the rest of the last sample is padding)."""

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        return {
            k: torch.from_numpy(getattr(self, k)[i])
            for k in ("tokens", "labels", "doc_ids", "positions")
        }


def pack_documents(
    docs: Sequence[TokenizedDoc], seq_length: int, *, seed: int, pad_id: int, shuffle: bool = True
) -> PackedSequences:
    """Pack tokenized documents into [N, seq_length] samples (see module docstring)."""
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}; expected >= 1")
    docs = [d for d in docs if d.ids.size]
    if not docs:
        raise ValueError("no tokens to pack: every document is empty")
    order = np.arange(len(docs))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(docs))
    ordered = [docs[i] for i in order]
    stream = np.concatenate([d.ids for d in ordered]).astype(np.int64)
    lengths = np.array([d.ids.size for d in ordered])
    doc_index = np.repeat(np.arange(len(ordered)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(stream.size) - np.repeat(starts, lengths)

    n = stream.size
    num = -(-n // seq_length)
    total = num * seq_length
    tokens = np.full(total, pad_id, dtype=np.int64)
    tokens[:n] = stream
    gdoc = np.full(total, -1, dtype=np.int64)
    gdoc[:n] = doc_index
    positions = np.zeros(total, dtype=np.int64)
    positions[:n] = pos
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    same_doc = doc_index[1:] == doc_index[:-1]
    labels[: n - 1] = np.where(same_doc, stream[1:], IGNORE_INDEX)

    tokens, labels, gdoc, positions = (
        a.reshape(num, seq_length) for a in (tokens, labels, gdoc, positions)
    )
    # renumber documents from 0 inside each sample; padding stays -1
    first = gdoc[:, :1]
    local = np.where(gdoc >= 0, gdoc - first, -1)
    return PackedSequences(
        tokens, labels, local, positions, tuple(d.doc_id for d in ordered), int(n)
    )


def iterate_batches(
    packed: PackedSequences,
    micro_batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this data-parallel rank's micro-batches for one epoch.

    Samples are shuffled per epoch with (seed, epoch) and dealt round-robin to ranks, so ranks
    never share a sample. Tensors: tokens/labels/doc_ids/positions [micro_batch_size, seq_length].
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}; expected >= 1")
    order = np.arange(len(packed))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(packed))
    mine = order[rank::world_size]
    if drop_last:
        usable = (len(order) // world_size) // micro_batch_size * micro_batch_size
        mine = mine[:usable]
    for b in range(0, len(mine), micro_batch_size):
        idx = mine[b : b + micro_batch_size]
        yield {
            k: torch.from_numpy(getattr(packed, k)[idx])
            for k in ("tokens", "labels", "doc_ids", "positions")
        }


__all__ = [
    "IGNORE_INDEX",
    "PackedSequences",
    "TokenizedDoc",
    "iterate_batches",
    "pack_documents",
    "tokenize_documents",
]
