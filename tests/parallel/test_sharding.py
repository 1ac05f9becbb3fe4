"""Sequence layouts (``megatron_ext.parallel.sharding``): pure index maths, no process group.

Compared: for every layout, world size and awkward length (odd, shorter than 2P, packed rows
with short documents and a reappearing id, rows with different document structure), the parts
``shard_tensor`` gives every rank against an independent oracle written here from the layout
definition in docs/context_parallel.md, "Layouts" (document slices of ceil(n / slices) tokens;
zigzag rank r holds slices r and 2P-1-r), and ``unshard_tensors`` of those parts against the
original tensor. Everything is integer bookkeeping or copies, so the comparisons are exact
(equality).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.parallel import make_layout, shard_tensor, unshard_tensors

CASES = [
    pytest.param(16, None, id="S16"),
    pytest.param(13, None, id="odd13"),
    pytest.param(3, None, id="shorter-than-2P"),
    pytest.param(1, None, id="S1"),
    pytest.param(
        17, torch.tensor([[5] * 6 + [2] * 2 + [5] * 9, [1] * 17]), id="packed+reappearing-id"
    ),
    pytest.param(11, torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]), id="all-length-1"),
]


def _docs(doc_ids: torch.Tensor | None, S: int, b: int) -> list[tuple[int, int]]:
    """(start, length) of each document of row b."""
    if doc_ids is None:
        return [(0, S)]
    row, out, start = doc_ids[b].tolist(), [], 0
    for s in range(1, S + 1):
        if s == S or row[s] != row[s - 1]:
            out.append((start, s - start))
            start = s
    return out


def _oracle(kind: str, P: int, S: int, doc_ids, b: int, r: int) -> list[tuple[int, int]]:
    """(global index or -1, position or -1) of rank r's tokens of row b, before row padding."""
    n_slices = 2 * P if kind == "zigzag" else P
    tokens = []
    for start, n in _docs(doc_ids, S, b):
        c = math.ceil(n / n_slices)
        for s in (r, n_slices - 1 - r) if kind == "zigzag" else (r,):
            for p in range(s * c, (s + 1) * c):
                tokens.append((start + p, p) if p < n else (-1, -1))
    return tokens


@pytest.mark.parametrize("kind", ["zigzag", "contiguous"])
@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize(("S", "doc_ids"), CASES)
def test_layout_matches_oracle_and_round_trips(kind, P, S, doc_ids) -> None:
    lay = make_layout(kind, S, P, doc_ids=doc_ids)
    B = 1 if doc_ids is None else doc_ids.shape[0]
    x = torch.randn(B, S, 3, 2)
    parts = [shard_tensor(x, lay, r) for r in range(P)]
    for b in range(B):
        for r in range(P):
            want = _oracle(kind, P, S, doc_ids, b, r)
            bl = min(b, lay.index.shape[1] - 1)
            idx, pos = lay.index[r, bl].tolist(), lay.positions[r, bl].tolist()
            n = len(want)
            assert list(zip(idx[:n], pos[:n])) == want
            assert idx[n:] == [-1] * (lay.local_len - n) and pos[n:] == idx[n:]  # row padding
            real = torch.tensor(idx) >= 0
            assert torch.equal(parts[r][b, real], x[b, torch.tensor(idx)[real]])
            assert bool((parts[r][b, ~real] == 0).all())
    # every token exactly once, nothing rounded away, and the way back is exact
    for row in lay.index.transpose(0, 1):  # [P, L] per row of the layout
        assert sorted(row[row >= 0].tolist()) == list(range(S))
    assert torch.equal(unshard_tensors(parts, lay), x)


def test_zigzag_balances_causal_work() -> None:
    """Zigzag: every rank holds slices r and 2P-1-r, so positions sum to the same total."""
    lay = make_layout("zigzag", 32, 4)
    totals = lay.positions.clamp(min=0).sum(-1).flatten().tolist()
    assert totals == [totals[0]] * 4
    assert lay.positions[1, 0].tolist() == [4, 5, 6, 7, 24, 25, 26, 27]


def test_packed_positions_doc_ids_and_lengths() -> None:
    doc_ids = torch.tensor([[7, 7, 7, 7, 7, 3, 3, 3]])
    lay = make_layout("zigzag", 8, 2, doc_ids=doc_ids)
    # doc 0 (n=5): c=2, padded to 8; doc 1 (n=3): c=1, padded to 4
    assert lay.index[0, 0].tolist() == [0, 1, -1, -1, 5, -1]
    assert lay.positions[1, 0].tolist() == [2, 3, 4, -1, 1, 2]
    assert lay.doc_ids[1, 0].tolist() == [0, 0, 0, 0, 1, 1]
    assert lay.doc_lengths[1, 0].tolist() == [5, 5, 5, 0, 3, 3]


def test_pad_value_labels_and_other_dims() -> None:
    lay = make_layout("zigzag", 5, 2)
    labels = torch.arange(5)[None]
    assert shard_tensor(labels, lay, 0, pad_value=-100).tolist() == [[0, 1, -100, -100]]
    assert shard_tensor(labels, lay, 1, pad_value=-100).tolist() == [[2, 3, 4, -100]]
    x = torch.randn(5, 2, 3)  # Megatron's [S, B, ...]
    parts = [shard_tensor(x, lay, r, dim=0) for r in range(2)]
    assert parts[0].shape == (4, 2, 3)
    assert torch.equal(unshard_tensors(parts, lay, dim=0), x)
    y = torch.randn(2, 3, 5)  # sequence last
    parts = [shard_tensor(y, lay, r, dim=-1) for r in range(2)]
    assert torch.equal(unshard_tensors(parts, lay, dim=-1), y)


def test_round_trip_is_differentiable() -> None:
    lay = make_layout("zigzag", 7, 2)
    x = torch.randn(1, 7, 2, requires_grad=True)
    y = unshard_tensors([shard_tensor(x, lay, r) for r in range(2)], lay)
    (y * torch.arange(7.0)[None, :, None]).sum().backward()
    assert torch.equal(x.grad, torch.arange(7.0)[None, :, None].expand(1, 7, 2))


ERRORS = [
    pytest.param(("ring", 8, 2), {}, "layout='ring'", id="kind"),
    pytest.param(("zigzag", 0, 2), {}, "seq_len=0", id="S0"),
    pytest.param(("zigzag", 8, 0), {}, "world_size=0", id="P0"),
    pytest.param(
        ("zigzag", 8, 2),
        {"doc_ids": torch.zeros(1, 7, dtype=torch.long)},
        "doc_ids",
        id="doc-shape",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("args", "kw", "match"), ERRORS)
def test_bad_layout_arguments_raise(args, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_layout(*args, **kw)


def test_shard_and_unshard_check_lengths() -> None:
    lay = make_layout("zigzag", 8, 2)
    with pytest.raises(ValueError, match="expected S=8"):
        shard_tensor(torch.randn(1, 9), lay, 0)
    with pytest.raises(ValueError, match="expected one per rank"):
        unshard_tensors([torch.randn(1, 4)], lay)
    with pytest.raises(ValueError, match="rank=2"):
        shard_tensor(torch.randn(1, 8), lay, 2)
