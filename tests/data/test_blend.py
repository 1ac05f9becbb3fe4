"""Blends by weight and sharding over data-parallel x context-parallel ranks.

- Blend: each corpus's share of an epoch equals its weight (largest-remainder rounding, exact
  integers), every prefix of the epoch is within one sample of the weight (draws spread
  evenly), each blended row is exactly the row its corpus's own packing gives, and over
  several epochs a down-weighted corpus still shows every one of its samples.
- Sharding: with DP=2 x CP=2, the two CP ranks of a DP group receive identical rows, the DP
  groups receive disjoint samples that together are the whole epoch, and the CP shards cut by
  `parallel.batch.cp_shard_batch` put back together are exactly the rows (integer equality).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import TEXTS, write_jsonl

from megatron_ext.config import BlendSource, DataConfig
from megatron_ext.data.dataset import build_datasets
from megatron_ext.data.packing import (
    BlendedSequences,
    TokenizedDoc,
    blend_counts,
    iterate_batches,
    pack_documents,
)


def _packed(n_docs: int, base: int, seq: int = 4):
    docs = [TokenizedDoc(f"{base}-{i}", np.arange(base + 10 * i, base + 10 * i + 7, dtype=np.int32))
            for i in range(n_docs)]
    return pack_documents(docs, seq, seed=0, pad_id=0)


def test_blend_counts_largest_remainder() -> None:
    assert blend_counts([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert blend_counts([0.7, 0.3], 100).tolist() == [70, 30]
    assert blend_counts([1000, 1], 10).tolist() == [10, 1]  # every corpus drawn at least once
    with pytest.raises(ValueError, match=r"blend weights \[1, 0\]; expected positive numbers"):
        blend_counts([1, 0], 10)


def test_blend_shares_rows_and_coverage() -> None:
    big, small = _packed(40, 1000), _packed(8, 5000)  # 70 and 14 samples
    blend = BlendedSequences([big, small], [0.25, 0.75], seed=3)
    n = len(big) + len(small)
    assert len(blend) == n and blend.counts.tolist() == [21, 63]
    src = blend.source
    for i in range(1, n + 1):  # every prefix within one sample of its share
        assert abs((src[:i] == 1).sum() - i * 63 / n) <= 1.0
    for epoch in (0, 1):
        idx = np.arange(n)
        rows = blend.batch(idx, epoch=epoch)
        which, local = blend.locate(idx, epoch)
        for j, part in enumerate((big, small)):
            sel = np.flatnonzero(which == j)
            want = part.batch(local[sel])
            for key in ("tokens", "labels", "doc_ids", "positions"):
                assert torch.equal(rows[key][torch.from_numpy(sel)], want[key])
    # the small corpus repeats (63 draws of 14 samples), each pass a permutation of all of it
    _, local = blend.locate(np.arange(n), 0)
    sel = blend.source == 1
    draws = local[sel][np.argsort(blend.draw[sel])]  # in draw order
    assert all(sorted(draws[k : k + 14].tolist()) == list(range(14)) for k in (0, 14, 28, 42))
    # the big corpus gets 21 draws per epoch: 4 epochs cover all of its 70 samples
    seen = set()
    for epoch in range(4):
        w, loc = blend.locate(np.arange(n), epoch)
        seen |= set(loc[w == 0].tolist())
    assert seen == set(range(70))


def test_build_datasets_blend(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [t.upper() for t in TEXTS] * 3)
    cfg = DataConfig(blend=[BlendSource(path=str(a), weight=3.0),
                            BlendSource(path=str(b), weight=1.0)],
                     cache_dir=str(tmp_path / "cache"), seq_length=16, eval_fraction=0.2)
    ds = build_datasets(cfg, seed=0, progress=False)
    assert isinstance(ds.train, BlendedSequences)
    total = sum(len(p) for p in ds.train.parts)
    assert ds.train.counts.tolist() == blend_counts([3, 1], total).tolist()
    assert [c.eval_documents for c in ds.corpora] == [4, 4]
    assert len(ds.eval) == sum(len(p) for p in ds.eval.parts)
    last = ds.eval.parts[1]  # the concatenated held-out set ends with corpus b's rows
    assert torch.equal(ds.eval.sample(len(ds.eval) - 1)["tokens"],
                       last.sample(len(last) - 1)["tokens"])
    assert torch.equal(ds.train.sample(5)["labels"], ds.train.batch([5])["labels"][0])
    batch = next(iterate_batches(ds.train, 4, seed=0))
    assert batch["tokens"].shape == (4, 16)
    with pytest.raises(ValueError, match=r"data.corpus='x.jsonl' and data.blend are both set"):
        DataConfig(corpus="x.jsonl", blend=[BlendSource(path=str(a))])


def _unshard(locals_: list[dict], lay, shape) -> torch.Tensor:
    full = torch.full(shape, -7, dtype=torch.int64)
    for r, loc in enumerate(locals_):
        index = lay.index[r].expand(shape[0], -1)
        real = index >= 0
        rows = torch.arange(shape[0]).unsqueeze(1).expand_as(index)
        full[rows[real], index[real]] = loc["tokens"][real]
    return full


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_dp_cp_sharding(layout: str) -> None:
    from megatron_ext.parallel.batch import cp_shard_batch

    packed = _packed(30, 100, seq=12)
    dp, cp = 2, 2
    per_rank = {}
    for rank in range(dp * cp):  # Megatron order with TP=1: CP ranks adjacent, DP outer
        dp_rank, cp_rank = divmod(rank, cp)
        per_rank[rank] = list(iterate_batches(packed, 2, seed=1, rank=dp_rank, world_size=dp,
                                              drop_last=False))
    for g in range(dp):
        a, b = per_rank[g * cp], per_rank[g * cp + 1]
        assert len(a) == len(b) and all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    rows = [tuple(r) for g in range(dp) for bt in per_rank[g * cp] for r in bt["tokens"].tolist()]
    assert sorted(rows) == sorted(tuple(r) for r in packed.tokens.tolist())  # disjoint, complete
    for batch in per_rank[0]:
        shards = [cp_shard_batch(batch, layout=layout, world_size=cp, rank=r)
                  for r in range(cp)]
        full = _unshard([s[0] for s in shards], shards[0][1], batch["tokens"].shape)
        assert torch.equal(full, batch["tokens"])


def test_start_batch_skips_exactly() -> None:
    packed = _packed(30, 100)
    every = list(iterate_batches(packed, 3, seed=2, rank=1, world_size=2))
    later = list(iterate_batches(packed, 3, seed=2, rank=1, world_size=2, start_batch=2))
    assert len(later) == len(every) - 2
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(every[2:], later))


def test_eval_corpus_replaces_the_holdout(tmp_path: Path) -> None:
    """With data.eval_corpus, every training document trains and the held-out set is that
    corpus (for the embedded one: only its held-out split, never a training book)."""
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    cfg = DataConfig(corpus=str(a), eval_corpus="embedded", eval_split="dev",
                     cache_dir=str(tmp_path / "cache"), seq_length=64)
    ds = build_datasets(cfg, seed=0, progress=False)
    assert ds.corpora[0].train_documents == len(TEXTS) and ds.corpora[0].eval_documents == 0
    assert ds.eval.doc_order == ("austen/northanger-abbey",) and ds.corpora[1].eval_documents == 1
