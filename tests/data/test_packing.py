"""Packing: document boundaries, determinism under a seed, no token lost or duplicated.

Exact integer comparisons throughout: packing only moves token ids, so any mismatch is a bug.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_ext.config import DataConfig
from megatron_ext.data.dataset import build_datasets
from megatron_ext.data.packing import (
    IGNORE_INDEX,
    TokenizedDoc,
    iterate_batches,
    pack_documents,
    tokenize_documents,
)

PAD = 0


def _docs(lengths: list[int]) -> list[TokenizedDoc]:
    rng = np.random.default_rng(1)
    return [
        TokenizedDoc(f"d{i}", rng.integers(1, 1000, n).astype(np.int32))
        for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("seq_length", [1, 7, 16, 64, 500])
def test_no_token_lost_or_duplicated(seq_length: int) -> None:
    docs = _docs([5, 1, 33, 16, 2, 70])
    packed = pack_documents(docs, seq_length, seed=3, pad_id=PAD)
    by_id = {d.doc_id: d.ids for d in docs}
    stream = np.concatenate([by_id[i] for i in packed.doc_order])
    flat = packed.tokens.reshape(-1)
    n = stream.size
    assert packed.num_real_tokens == n == sum(d.ids.size for d in docs)
    assert np.array_equal(flat[:n], stream)
    assert (flat[n:] == PAD).all() and flat.size - n < seq_length
    assert sorted(packed.doc_order) == sorted(by_id)


def test_boundaries_positions_and_labels() -> None:
    docs = _docs([5, 3, 9])
    packed = pack_documents(docs, 4, seed=0, pad_id=PAD, shuffle=False)
    tokens, labels = packed.tokens.reshape(-1), packed.labels.reshape(-1)
    positions = packed.positions.reshape(-1)
    assert positions[:17].tolist() == list(range(5)) + list(range(3)) + list(range(9))
    # labels: next token inside the document, -100 at every document end and on padding
    expected = np.full(20, IGNORE_INDEX)
    for start, n in ((0, 5), (5, 3), (8, 9)):
        expected[start : start + n - 1] = tokens[start + 1 : start + n]
    assert np.array_equal(labels, expected)
    # doc_ids restart at 0 in each sample and are -1 on padding
    assert packed.doc_ids.tolist() == [
        [0, 0, 0, 0],
        [0, 1, 1, 1],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [0, -1, -1, -1],
    ]
    # a document split over samples keeps counting its positions
    assert packed.positions[2].tolist() == [0, 1, 2, 3]
    assert packed.positions[3].tolist() == [4, 5, 6, 7]


def test_deterministic_under_seed() -> None:
    docs = _docs([10] * 12)
    a = pack_documents(docs, 8, seed=5, pad_id=PAD)
    b = pack_documents(docs, 8, seed=5, pad_id=PAD)
    c = pack_documents(docs, 8, seed=6, pad_id=PAD)
    assert np.array_equal(a.tokens, b.tokens) and a.doc_order == b.doc_order
    assert a.doc_order != c.doc_order
    ba = [x["tokens"] for x in iterate_batches(a, 2, seed=1)]
    bb = [x["tokens"] for x in iterate_batches(a, 2, seed=1)]
    be = [x["tokens"] for x in iterate_batches(a, 2, seed=1, epoch=1)]
    assert all(torch.equal(x, y) for x, y in zip(ba, bb))
    assert not all(torch.equal(x, y) for x, y in zip(ba, be))


def test_ranks_partition_samples() -> None:
    packed = pack_documents(_docs([9] * 10), 4, seed=0, pad_id=PAD)
    seen = []
    for rank in range(3):
        for batch in iterate_batches(packed, 2, seed=0, rank=rank, world_size=3, drop_last=False):
            seen += [tuple(r) for r in batch["tokens"].tolist()]
    assert sorted(seen) == sorted(tuple(r) for r in packed.tokens.tolist())
    # drop_last: every rank gets the same number of full micro-batches
    counts = [
        sum(1 for _ in iterate_batches(packed, 2, seed=0, rank=r, world_size=3)) for r in range(3)
    ]
    assert len(set(counts)) == 1 and counts[0] == len(packed) // 3 // 2


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"seq_length=0; expected >= 1"):
        pack_documents(_docs([3]), 0, seed=0, pad_id=PAD)
    with pytest.raises(ValueError, match=r"no tokens to pack"):
        pack_documents([TokenizedDoc("e", np.zeros(0, np.int32))], 4, seed=0, pad_id=PAD)
    packed = pack_documents(_docs([9]), 4, seed=0, pad_id=PAD)
    with pytest.raises(ValueError, match=r"rank=2 outside \[0, world_size=2\)"):
        next(iterate_batches(packed, 1, seed=0, rank=2, world_size=2))
    with pytest.raises(ValueError, match=r"micro_batch_size=0; expected >= 1"):
        next(iterate_batches(packed, 0, seed=0))


def test_tokenize_split_pieces_round_trip() -> None:
    from megatron_ext.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    text = "It is a truth universally acknowledged.\n" * 50 + "The end"
    (doc,) = tokenize_documents([("x", text)], tok, eot_id=None, progress=False, piece_chars=97)
    assert tok.decode(doc.ids.tolist()) == text


def test_build_datasets_on_embedded_corpus(tmp_path) -> None:
    cfg = DataConfig(seq_length=64, max_documents=2, cache_dir=str(tmp_path))
    ds = build_datasets(cfg, seed=0, progress=False)
    assert ds.vocab_size == 4096
    assert ds.train.seq_length == 64 and len(ds.train) > 10 and len(ds.eval) > 10
    assert ds.train.tokens.max() < ds.vocab_size
    # every document of the stream ends with EOT, with no loss on it
    ends = np.flatnonzero(ds.train.tokens.reshape(-1) == ds.eot_id)
    assert ends.size >= 2
    assert (ds.train.labels.reshape(-1)[ends] == IGNORE_INDEX).all()
