"""Pack tokenised documents into fixed-length training sequences, blend corpora, deal batches.

Packing keeps document boundaries: every sample carries, per token, the document it belongs to
(`doc_ids`, numbered from 0 inside the sample, -1 for padding) and its position *inside that
document* (`positions`, continuing across sample boundaries when a document is split), so
attention can refuse to cross documents and position-dependent methods (RoPE, DCA, LongHeads,
Llama-4 temperature) see per-document positions (docs/data.md).

Layout: documents (each ending with the tokenizer's EOS) are concatenated in a seeded order into
one stream, cut into consecutive blocks of `seq_length` tokens. `labels[i]` is the next token of
the stream when it belongs to the same document, else -100 (no loss across a boundary, none on
padding). The last block is padded with `pad_id` (doc_id -1, label -100), so no token is lost;
no token is repeated. Everything is deterministic given the seed.

Samples are built on demand from the memory-mapped token file (`PackedSequences.batch`), so a
corpus larger than memory packs in O(documents) memory. `BlendedSequences` mixes several packed
corpora by weight; `iterate_batches` deals samples to data-parallel ranks (every context-parallel
rank of a data-parallel group receives the same rows and keeps its own shard of them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ext.data.indexed import TokenDocuments

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
            pieces = split_text(text, piece_chars)
            encoded = tokenizer.encode_batch(pieces) if pieces else []
            ids = [i for enc in encoded for i in enc.ids]
            if eot_id is not None:
                ids.append(eot_id)
            out.append(TokenizedDoc(doc_id, np.asarray(ids, dtype=np.int32)))
            bar.advance(task, len(text))
    return out


def split_text(text: str, piece_chars: int) -> list[str]:
    """Cut `text` into pieces of about `piece_chars`, each ending just after a newline.

    A cut is preferably made at a newline with a non-space character on both sides, where a
    byte-level pre-tokenizer splits anyway, so the pieces encode to the same ids as the whole
    text; failing that, after any newline.
    """
    pieces, start = [], 0
    while start < len(text):
        end = min(start + piece_chars, len(text))
        if end < len(text):
            cut = _clean_newline(text, start, end)
            if cut > start:
                end = cut + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _clean_newline(text: str, start: int, end: int, tries: int = 64) -> int:
    """Last newline in text[start:end] between two non-space characters (else the last one)."""
    last = nl = text.rfind("\n", start, end)
    for _ in range(tries):
        if nl <= start:
            break
        if not text[nl - 1].isspace() and nl + 1 < len(text) and not text[nl + 1].isspace():
            return nl
        nl = text.rfind("\n", start, nl)
    return last


class PackedSequences:
    """Documents of one tokenised corpus packed into [len(self), seq_length] samples, on demand.

    Args:
        docs: the corpus's tokenised documents.
        order: indices into `docs`, in stream order (the documents used, already shuffled).
        seq_length: tokens per sample.
        pad_id: token id of the padding at the end of the last sample.
        doc_order: names of the documents in stream order (defaults to their indices).
        vocab_size: when given, a batch holding an id >= vocab_size raises (foreign data).
    """

    def __init__(self, docs: TokenDocuments, order: np.ndarray, seq_length: int, *, pad_id: int,
                 doc_order: tuple | None = None, vocab_size: int | None = None) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length}; expected >= 1")
        order = np.asarray(order, dtype=np.int64)
        order = order[docs.lengths[order] > 0]
        if order.size == 0:
            raise ValueError(f"{docs.name}: no tokens to pack: every document is empty")
        self.docs = docs
        self.order = order
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self._seq = seq_length
        self._cum = np.concatenate([[0], np.cumsum(docs.lengths[order])])
        self.num_real_tokens = int(self._cum[-1])
        """Tokens that come from documents (the rest of the last sample is padding)."""
        self.doc_order = doc_order if doc_order is not None else tuple(order.tolist())
        """Documents in stream order (what the seed decided)."""
        self._full: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return -(-self.num_real_tokens // self._seq)

    @property
    def seq_length(self) -> int:
        return self._seq

    def batch(self, idx: np.ndarray | list[int], epoch: int = 0) -> dict[str, torch.Tensor]:
        """Samples `idx` as int64 tensors tokens / labels / doc_ids / positions [len(idx), S].

        `epoch` is accepted for the interface `iterate_batches` uses; a packed corpus is the
        same every epoch (the order of its samples is what changes).
        """
        del epoch
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        S, n = self._seq, self.num_real_tokens
        p = idx[:, None] * S + np.arange(S + 1)  # [B, S+1] stream positions (+1 for labels)
        valid = p < n
        k = np.searchsorted(self._cum, np.minimum(p, n - 1), side="right") - 1  # stream doc
        off = np.minimum(p, n - 1) - self._cum[k]
        flat = self.docs.starts[self.order[k]] + off
        tok = np.where(valid, np.asarray(self.docs.tokens[flat.reshape(-1)]).reshape(p.shape)
                       .astype(np.int64), self.pad_id)
        if self.vocab_size is not None and tok.size and tok.max() >= self.vocab_size:
            raise ValueError(f"{self.docs.name}: token id {int(tok.max())} >= the vocabulary "
                             f"({self.vocab_size}); the data was tokenised with another tokenizer "
                             "than data.tokenizer")
        gdoc = np.where(valid, k, -1)
        same = valid[:, 1:] & (gdoc[:, 1:] == gdoc[:, :-1])
        labels = np.where(same, tok[:, 1:], IGNORE_INDEX)
        local = np.where(valid[:, :S], gdoc[:, :S] - gdoc[:, :1], -1)
        out = {"tokens": tok[:, :S], "labels": labels, "doc_ids": local,
               "positions": np.where(valid[:, :S], off[:, :S], 0)}
        return {key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in out.items()}

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}

    def _materialise(self) -> dict[str, np.ndarray]:
        if self._full is None:
            self._full = {k: v.numpy() for k, v in self.batch(np.arange(len(self))).items()}
        return self._full

    @property
    def tokens(self) -> np.ndarray:
        """All samples' tokens [N, S] (materialised: for small corpora and tests)."""
        return self._materialise()["tokens"]

    @property
    def labels(self) -> np.ndarray:
        return self._materialise()["labels"]

    @property
    def doc_ids(self) -> np.ndarray:
        return self._materialise()["doc_ids"]

    @property
    def positions(self) -> np.ndarray:
        return self._materialise()["positions"]


def pack_documents(
    docs: Sequence[TokenizedDoc], seq_length: int, *, seed: int, pad_id: int, shuffle: bool = True
) -> PackedSequences:
    """Pack in-memory tokenized documents into [N, seq_length] samples (see module docstring)."""
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}; expected >= 1")
    docs = [d for d in docs if d.ids.size]
    if not docs:
        raise ValueError("no tokens to pack: every document is empty")
    lengths = np.array([d.ids.size for d in docs], dtype=np.int64)
    flat = np.concatenate([d.ids for d in docs]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    order = np.arange(len(docs))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(docs))
    mem = TokenDocuments(flat, starts, lengths, "in-memory documents")
    return PackedSequences(mem, order, seq_length, pad_id=pad_id,
                           doc_order=tuple(docs[i].doc_id for i in order))


class ConcatSequences:
    """Several packed corpora one after another (held-out sets of a blend)."""

    def __init__(self, parts: Sequence) -> None:
        if not parts:
            raise ValueError("no corpora to concatenate")
        self.parts = list(parts)
        self._cum = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._cum[-1])

    @property
    def seq_length(self) -> int:
        return self.parts[0].seq_length

    def batch(self, idx: np.ndarray | list[int], epoch: int = 0) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        part = np.searchsorted(self._cum, idx, side="right") - 1
        return _gather(self.parts, part, idx - self._cum[part], epoch)

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}


def _gather(parts: Sequence, part: np.ndarray, local: np.ndarray, epoch: int
            ) -> dict[str, torch.Tensor]:
    """Rows local[i] of parts[part[i]], in the order given."""
    out: dict[str, torch.Tensor] = {}
    for j in np.unique(part):
        rows = np.flatnonzero(part == j)
        got = parts[j].batch(local[rows], epoch=epoch)
        for key, value in got.items():
            if key not in out:
                out[key] = torch.empty((part.size, *value.shape[1:]), dtype=value.dtype)
            out[key][torch.from_numpy(rows)] = value
    return out


def blend_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """Samples per corpus for one epoch of `total` samples: largest-remainder rounding of
    weights x total, at least one each."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or (w <= 0).any():
        raise ValueError(f"blend weights {list(weights)}; expected positive numbers")
    share = w / w.sum() * total
    counts = np.floor(share).astype(np.int64)
    rest = total - counts.sum()
    counts[np.argsort(-(share - counts), kind="stable")[:rest]] += 1
    return np.maximum(counts, 1)


class BlendedSequences:
    """Corpora mixed by weight: one epoch has sum(len(part)) samples, corpus j contributes
    `blend_counts(weights)[j]` of them, spread evenly through the epoch.

    A corpus is read as an endless sequence of its own shuffled epochs (seeded by
    (seed, j, its epoch)): a corpus drawn more often than it has samples repeats them, each
    pass in a new order; one drawn less often continues where the last blended epoch stopped,
    so over several epochs every sample is used.
    """

    def __init__(self, parts: Sequence, weights: Sequence[float], *, seed: int) -> None:
        if len(parts) != len(weights):
            raise ValueError(f"{len(parts)} corpora but {len(weights)} weights")
        self.parts = list(parts)
        self.seed = seed
        self.counts = blend_counts(weights, sum(len(p) for p in self.parts))
        # corpus j's draws sit at times (t + 0.5) / count_j: evenly spread, exact counts
        times = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts])
        which = np.repeat(np.arange(len(self.parts)), self.counts)
        draw = np.concatenate([np.arange(c) for c in self.counts])
        order = np.argsort(times, kind="stable")
        self.source, self.draw = which[order], draw[order]

    def __len__(self) -> int:
        return int(self.source.size)

    @property
    def seq_length(self) -> int:
        return self.parts[0].seq_length

    def locate(self, idx: np.ndarray, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(corpus, sample in corpus) of blended samples `idx` in blended epoch `epoch`."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        src = self.source[idx]
        local = np.empty_like(idx)
        for j in np.unique(src):
            sel = np.flatnonzero(src == j)
            n = len(self.parts[j])
            g = epoch * int(self.counts[j]) + self.draw[idx[sel]]  # draws of corpus j so far
            for ep in np.unique(g // n):
                perm = np.random.default_rng([self.seed, int(j), int(ep)]).permutation(n)
                hit = g // n == ep
                local[sel[hit]] = perm[g[hit] % n]
        return src, local

    def batch(self, idx: np.ndarray | list[int], epoch: int = 0) -> dict[str, torch.Tensor]:
        src, local = self.locate(np.asarray(idx), epoch)
        return _gather(self.parts, src, local, epoch)

    def sample(self, i: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i], epoch).items()}


def iterate_batches(
    packed,
    micro_batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    start_batch: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this data-parallel rank's micro-batches for one epoch.

    Samples are shuffled per epoch with (seed, epoch) and dealt round-robin to ranks, so ranks
    never share a sample. Give every context-parallel rank of one data-parallel group the same
    `rank` (its data-parallel rank): they receive the same rows and each keeps its own shard.

    Args:
        packed: PackedSequences, BlendedSequences or ConcatSequences (anything with
            `__len__` and `batch(idx, epoch)`).
        micro_batch_size: rows per batch.
        seed, epoch: the shuffle of this epoch.
        rank, world_size: data-parallel rank and size.
        shuffle: shuffle the samples (else in order).
        drop_last: every rank gets the same number of full batches.
        start_batch: skip this many of this rank's batches (resuming mid-epoch), without
            building them.

    Yields:
        dicts of int64 tensors tokens / labels / doc_ids / positions [micro_batch_size, S].
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}; expected >= 1")
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch}; expected >= 0")
    order = np.arange(len(packed))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(packed))
    mine = order[rank::world_size]
    if drop_last:
        usable = (len(order) // world_size) // micro_batch_size * micro_batch_size
        mine = mine[:usable]
    for b in range(start_batch * micro_batch_size, len(mine), micro_batch_size):
        yield packed.batch(mine[b : b + micro_batch_size], epoch=epoch)


__all__ = [
    "IGNORE_INDEX",
    "BlendedSequences",
    "ConcatSequences",
    "PackedSequences",
    "TokenizedDoc",
    "blend_counts",
    "iterate_batches",
    "pack_documents",
    "split_text",
    "tokenize_documents",
]
