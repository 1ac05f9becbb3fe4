"""Chunked prefill and decode for a batch of prompts of different lengths.

A ``Session`` holds one cache per layer for B rows and feeds tokens at explicit positions.
``generate`` runs the whole loop:

1. prompts are right-padded into [B, S]; prefill feeds columns ``[s, s + chunk)`` with the
   positions of real tokens and -1 on padding (a padding slot is never stored nor seen), so
   every row is exactly what it would be alone;
2. each row's first new token comes from the logits at its own last prompt position (only those
   rows' hidden states reach the output layer: no [B, S, vocab] tensor);
3. decode feeds one token per row at that row's next position until ``max_new_tokens`` or a
   stop token (rows that stopped keep stepping so the batch stays rectangular; their extra
   tokens are dropped).

A prompt may hold packed documents (``doc_ids``): positions restart in each document, no token
attends across one, and the new tokens continue the prompt's last document (``documents.py``).

On a context-parallel model every rank of the group runs this loop with the same prompts: each
prefill step's columns are sharded over the ranks and every rank's caches end up holding the
whole prompt (``cp_prefill.py``); decode then runs on every rank, with the sampled tokens
broadcast from the group's first rank. Packed documents are not taken there (refused).

Length rules (dynamic NTK, DCA temperature) use the planned total length ``prompt +
max_new_tokens``: per row for the DCA temperature, the longest row's for dynamic NTK (one
frequency table per batch), so decode equals a full forward at that length.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_ext.inference.cp_prefill import broadcast_tokens, cp_prefill_step
from megatron_ext.inference.documents import RowDocuments, check_doc_ids
from megatron_ext.inference.forward import CachedModel
from megatron_ext.inference.sampling import SamplingParams, sample

__all__ = ["GenerationStats", "Session", "generate_tokens"]


class Session:
    """Caches of B rows being extended, and the step that feeds them.

    A row may hold packed documents (``doc_ids``, see ``documents.py``): positions restart at 0
    in every document, no token attends across one, and tokens fed without ids continue the
    row's current document.

    Args:
        cm: the model's cached walker.
        lengths: int [B], each row's planned total length (the cache capacity per row is the
            longest; also the length of length rules, for every document of the row).
        rope_len: dynamic-NTK length of the batch (default the longest row).
    """

    def __init__(self, cm: CachedModel, lengths: Sequence[int],
                 rope_len: int | None = None) -> None:
        self.cm = cm
        self.lengths = torch.tensor(list(lengths), dtype=torch.int64)
        self.capacity = int(self.lengths.max())
        self.rope_len = rope_len or self.capacity
        self.caches = cm.new_caches(len(self.lengths), self.capacity)
        self.docs = RowDocuments(len(self.lengths), self.capacity)

    def feed(self, tokens: torch.Tensor, positions: torch.Tensor,
             doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [n, B, hidden] of tokens [B, n].

        Args:
            tokens: int [B, n].
            positions: int [B, n], each token's index in its row (-1 = padding); a row's
                tokens continue it in order (0, 1, ... from the first feed on). Without
                documents this is the position.
            doc_ids: optional int [B, n] document ids, non-decreasing along a row: the row's
                current id continues its document, a larger id starts a new one at that token
                (its position restarts at 0). None: every token continues its row's current
                document (a row's first document fed without ids has id 0).
        """
        pieces = self.docs.split(positions, doc_ids)
        hidden = []
        with torch.no_grad():
            for piece in pieces:
                self.cm.reset_rows(self.caches, piece.reset)
                hidden.append(self.cm.step(self.caches, tokens[:, piece.cols].to(self.cm.device),
                                           piece.positions, self.lengths, self.rope_len))
        return torch.cat(hidden, 0)

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor,
               doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, n, vocab] of tokens fed at positions (every row); see ``feed``."""
        with torch.no_grad():
            return self.cm.logits_of(self.feed(tokens, positions, doc_ids))

    def prefill(
        self,
        tokens: torch.Tensor,
        lens: torch.Tensor,
        chunk_size: int,
        on_prefill: Callable[[int], None] | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed right-padded prompts from position 0 in steps of ``chunk_size`` columns.

        On a context-parallel model every rank of the group calls this with the same prompts:
        each step's columns are sharded over the ranks (``cp_prefill.py``) and every rank's
        caches end up holding the whole prompt.

        Args:
            tokens: int [B, S] prompts, right-padded. lens: int [B] real lengths (>= 1).
            chunk_size: prompt columns per step (under CP, split over the ranks).
            on_prefill: called with the number of prompt tokens each step consumed.
            doc_ids: optional int [B, S] document ids of the prompts (see ``feed``); refused on
                a context-parallel model.

        Returns:
            final hidden states [B, hidden] at each row's last prompt position.
        """
        B, S = tokens.shape
        lens = torch.as_tensor(lens, dtype=torch.int64).cpu()
        cm = self.cm
        if doc_ids is not None and cm.cp_group is not None:
            raise ValueError(
                "doc_ids (packed documents in a prompt) with context-parallel prefill is not "
                "supported; prefill packed prompts with context_parallel=1"
            )
        last = torch.zeros(B, cm.model.config.hidden_size, dtype=cm.dtype, device=cm.device)
        col = torch.arange(S).expand(B, S)
        positions = torch.where(col < lens[:, None], col, -1)
        with torch.no_grad():
            for s in range(0, S, chunk_size):
                e = min(S, s + chunk_size)
                if cm.cp_group is None:
                    ids = None if doc_ids is None else doc_ids[:, s:e]
                    h = self.feed(tokens[:, s:e], positions[:, s:e], ids)  # [n, B, hidden]
                    cols = col[:, s:e]
                else:
                    counts = (lens - s).clamp(0, e - s)
                    h, idx = cp_prefill_step(cm, self.caches, tokens[:, s:e], start=s,
                                             counts=counts, lengths=self.lengths,
                                             rope_len=self.rope_len)
                    cols = torch.where(idx >= 0, idx + s, -1)
                    self.docs.advance(counts)
                rows, at = (cols == (lens - 1)[:, None]).nonzero(as_tuple=True)
                if rows.numel():
                    rows, at = rows.to(h.device), at.to(h.device)
                    last[rows] = h[at, rows]
                if on_prefill is not None:
                    on_prefill(int((positions[:, s:e] >= 0).sum()))
            if cm.cp_group is not None:  # each row's last token lived on one rank
                dist.all_reduce(last, group=cm.cp_group)
        return last

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)


@dataclass
class GenerationStats:
    """What one ``generate_tokens`` call measured."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    cache_bytes: int = 0
    steps: list[float] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0


def generate_tokens(
    cm: CachedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    prefill_chunk_size: int,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
    on_prefill: Callable[[int], None] | None = None,
    stats: GenerationStats | None = None,
    doc_ids: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` after each prompt (ids); returns the new ids per row.

    A row stops after its first stop token (which is not returned). With ``doc_ids`` a prompt
    holds packed documents and the new tokens continue its last document.

    Args:
        cm: the model's cached walker.
        prompts: B token-id lists, each non-empty.
        max_new_tokens: >= 1.
        sampling: greedy / temperature / top-k / top-p.
        prefill_chunk_size: prompt columns per prefill step.
        stop_tokens: ids that end a row.
        generator: random source for sampling.
        on_prefill: called with the number of prompt tokens each prefill step consumed.
        stats: filled with timings when given.
        doc_ids: optional document ids per prompt token (B lists of the prompts' lengths),
            non-decreasing along each prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected at least one prompt and no empty prompt")
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    S = int(lens.max())
    tokens = torch.zeros(B, S, dtype=torch.int64)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.int64)
    docs = None if doc_ids is None else _doc_rows(doc_ids, lens)
    session = Session(cm, (lens + max_new_tokens).tolist())
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = int(lens.sum())

    t0 = time.perf_counter()
    last = session.prefill(tokens, lens, prefill_chunk_size, on_prefill, doc_ids=docs)
    with torch.no_grad():
        logits = cm.logits_of(last[None])[:, 0]  # [B, vocab]
    stats.prefill_s = time.perf_counter() - t0

    stop = set(int(t) for t in stop_tokens)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = sample(logits, sampling, generator)
        if cm.cp_group is not None:  # every rank decodes; they continue with one choice
            broadcast_tokens(nxt, cm.cp_group)
        nxt = nxt.cpu()
        for b in range(B):
            if not done[b]:
                tok = int(nxt[b])
                if tok in stop:
                    done[b] = True
                else:
                    out[b].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        h = session.feed(nxt[:, None], (lens + step)[:, None])
        with torch.no_grad():
            logits = cm.logits_of(h)[:, 0]
    stats.decode_s = time.perf_counter() - t0
    stats.new_tokens = sum(len(o) for o in out)
    stats.cache_bytes = session.cache_bytes()
    return out


def _doc_rows(doc_ids: Sequence[Sequence[int]], lens: torch.Tensor) -> torch.Tensor:
    """Per-prompt document ids -> int64 [B, S], right-padded with each row's last id."""
    got = [len(d) for d in doc_ids]
    if got != lens.tolist():
        raise ValueError(f"doc_ids lengths {got}; expected one id per prompt token, "
                         f"{lens.tolist()}")
    docs = torch.zeros(len(got), int(lens.max()), dtype=torch.int64)
    for b, d in enumerate(doc_ids):
        row = torch.as_tensor(list(d))
        if row.is_floating_point() or row.dtype == torch.bool:
            raise ValueError(f"doc_ids[{b}] dtype={row.dtype}; expected integer ids")
        docs[b] = row[-1]
        docs[b, : len(row)] = row
    return check_doc_ids(docs, tuple(docs.shape))
