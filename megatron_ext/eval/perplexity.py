"""Perplexity on held-out books at a given length, two protocols (docs/eval.md).

- `truncation` (YaRN's per-document protocol): the first L tokens of every held-out document
  that has at least L, one pass each; the reported value is the mean of the per-document
  perplexities. The per-token losses also give a loss-by-position curve in 128-token buckets,
  which shows where a method stops using or tolerating longer context.
- `sliding` (LongLoRA / ChunkLlama): the split as one token stream (documents separated by the
  end-of-text token), windows of L tokens every `stride` tokens; each window's loss is the mean
  over its predicted tokens and the perplexity is exp(mean of window losses). The papers use
  stride 256 over the whole split; on a CPU that is too many windows, so `max_windows` windows
  are taken evenly spaced over the valid starts (all of them when there are fewer), and the
  stride and count are recorded.

In both, a window of L tokens predicts its last L - 1 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

from megatron_ext.eval.samples import LengthError

__all__ = ["PROTOCOLS", "held_out_tokens", "perplexity", "sliding_starts"]

PROTOCOLS = ("truncation", "sliding")


@lru_cache(maxsize=4)
def held_out_tokens(split: str, tokenizer_path: str | None = None
                    ) -> tuple[tuple[str, np.ndarray], ...]:
    """(document id, token ids) of every document of an embedded-corpus split."""
    from megatron_ext.data.corpus import load_documents
    from megatron_ext.data.packing import tokenize_documents
    from megatron_ext.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    docs = tokenize_documents([(d.id, d.text) for d in load_documents(split)], tok, eot_id=None,
                              progress=False)
    return tuple((d.doc_id, d.ids.astype(np.int64)) for d in docs)


def sliding_starts(n_tokens: int, length: int, stride: int, max_windows: int | None
                   ) -> list[int]:
    """Window starts 0, stride, 2*stride, ... whose window fits in `n_tokens` tokens, thinned
    to `max_windows` evenly spaced ones (first and last kept)."""
    if stride < 1:
        raise ValueError(f"stride={stride}; expected >= 1")
    starts = list(range(0, n_tokens - length + 1, stride))
    if max_windows is not None and len(starts) > max_windows:
        idx = np.unique(np.round(np.linspace(0, len(starts) - 1, max_windows)).astype(int))
        starts = [starts[i] for i in idx]
    return starts


def perplexity(
    losses_fn: Callable[[torch.Tensor], torch.Tensor],
    length: int,
    *,
    split: str = "test",
    protocols: tuple[str, ...] = PROTOCOLS,
    stride: int | None = None,
    max_windows: int | None = 8,
    max_docs: int | None = None,
    eot_id: int = 0,
    bucket: int = 128,
    tokenizer_path: str | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Perplexity of a model at one length.

    Args:
        losses_fn: tokens [1, L] -> per-token losses [1, L-1] (`EvalModel.token_losses`).
        length: L.
        split: embedded-corpus split of held-out books ("test" or "dev").
        protocols: some of `PROTOCOLS`.
        stride: sliding-window stride; default L // 2.
        max_windows: most sliding windows (None: all).
        max_docs: use only the first N documents of the split (quick runs).
        eot_id: separator between documents in the sliding stream.
        bucket: tokens per bucket of the loss-by-position curve.
        advance: called with 1 after every forward pass (progress bars).

    Returns:
        {protocol: {...}} with 'ppl', the counts and, for truncation, 'per_doc' and
        'loss_by_position' (mean loss per `bucket` positions).

    Raises:
        LengthError: no document is L tokens long (truncation), or the split is shorter than L.
        ValueError: an unknown protocol.
    """
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"perplexity protocol {p!r}; expected some of {PROTOCOLS}")
    docs = held_out_tokens(split, tokenizer_path)[:max_docs]
    out: dict = {}
    if "truncation" in protocols:
        long = [(i, ids) for i, ids in docs if ids.size >= length]
        if not long:
            raise LengthError(f"perplexity at length {length}: the longest {split} document has "
                              f"{max(ids.size for _, ids in docs)} tokens")
        per_doc, rows = {}, []
        for doc_id, ids in long:
            loss = losses_fn(torch.from_numpy(ids[:length])[None])[0].double().cpu()
            per_doc[doc_id] = math.exp(loss.mean().item())
            rows.append(loss)
            if advance:
                advance(1)
        mean_loss = torch.stack(rows).mean(0)  # [L-1], averaged over documents
        buckets = [mean_loss[i:i + bucket].mean().item() for i in range(0, length - 1, bucket)]
        out["truncation"] = {
            "ppl": float(np.mean(list(per_doc.values()))),
            "ppl_pooled": math.exp(mean_loss.mean().item()),
            "docs": len(per_doc), "per_doc": per_doc,
            "bucket": bucket, "loss_by_position": buckets,
        }
    if "sliding" in protocols:
        stream = np.concatenate([np.append(ids, eot_id) for _, ids in docs])
        s = stride or max(length // 2, 1)
        starts = sliding_starts(stream.size, length, s, max_windows)
        if not starts:
            raise LengthError(f"perplexity at length {length}: the {split} split has only "
                              f"{stream.size} tokens")
        window_losses = []
        for st in starts:
            loss = losses_fn(torch.from_numpy(stream[st:st + length])[None])[0]
            window_losses.append(loss.double().mean().item())
            if advance:
                advance(1)
        out["sliding"] = {"ppl": math.exp(float(np.mean(window_losses))), "stride": s,
                          "windows": len(starts), "stream_tokens": int(stream.size)}
    return out


def passes_needed(length: int, *, split: str = "test", protocols: tuple[str, ...] = PROTOCOLS,
                  stride: int | None = None, max_windows: int | None = 8,
                  max_docs: int | None = None, tokenizer_path: str | None = None) -> int:
    """Forward passes `perplexity` will make with these arguments (for progress bars)."""
    docs = held_out_tokens(split, tokenizer_path)[:max_docs]
    n = 0
    if "truncation" in protocols:
        n += sum(ids.size >= length for _, ids in docs)
    if "sliding" in protocols:
        total = sum(ids.size + 1 for _, ids in docs)
        n += len(sliding_starts(total, length, stride or max(length // 2, 1), max_windows))
    return n
