"""Bytes each rank sends per call, and the errors of plans that cannot honour a mask.

Volume (check P2 of docs/methods/checks.md): after one forward and one backward of
``cp_attn_func``, the per-rank byte counters of ``parallel.comm`` must equal the analytic volume
of each plan, written out here (fp32, 4 bytes; n_kv = B·L·Hkv·D elements of one K shard):

- ring: forward (P-1)·2·n_kv; backward (P-1)·2·n_kv (K/V again) + P·2·n_kv (dK/dV home);
- allgather: (P-1)·2·n_kv forward, the same reduce-scattered backward;
- a2a: (P-1)/P of q, the (replicated) K/V and out forward, the same backward;
- halo: the keys some query of another rank can see, counted by a brute-force oracle over the
  global token positions, equal to the closed form (W-1)·([r < P-1] + [r > 0]) keys per row for
  one zigzag document, and the same at S = 32 and 64 (independent of the sequence length);
- local (chunks aligned with shards): nothing.

Errors: every refusal raises ValueError with a message naming the plan and the reason, on all
ranks before any communication (so nothing hangs). Counts are exact integers: equality.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from method_factory import make_method
from utils import run_distributed

from megatron_ext.parallel import bytes_sent, cp_attn_func, make_layout, reset_bytes_sent, shard

pytestmark = pytest.mark.distributed

B, H, HKV, D, E = 1, 4, 2, 8, 4  # E: bytes per fp32 element


def _run(group, S, attn, plan, layout="zigzag", doc_ids=None, H=H, Hkv=HKV, **kw):
    """One forward + backward on random shards; returns this rank's {counter: bytes}."""
    lay = make_layout(layout, S, dist.get_world_size(group), doc_ids=doc_ids)
    x = [torch.randn(B, S, h, D) for h in (H, Hkv, Hkv)]
    q, k, v = [shard(t, layout=lay, group=group).requires_grad_() for t in x]
    reset_bytes_sent()
    method = make_method(attn, **kw)
    cp_attn_func(q, k, v, group=group, method=method, plan=plan, layout=lay).sum().backward()
    return bytes_sent(), lay.local_len


def _halo_oracle(lay, rank: int, window: int) -> int:
    """Keys of ``rank`` that a query on another rank sees (window rule, same document)."""
    P, (_, rows, L) = lay.world_size, lay.index.shape
    owner = {}  # (row, doc, position) -> rank
    for r in range(P):
        for b in range(rows):
            for s in range(L):
                if lay.positions[r, b, s] >= 0:
                    owner[(b, int(lay.doc_ids[r, b, s]), int(lay.positions[r, b, s]))] = r
    needed = set()
    for (b, d, p), r in owner.items():
        if r == rank:
            continue
        for j in range(max(0, p - window + 1), p + 1):
            if owner[(b, d, j)] == rank:
                needed.add((r, b, d, j))  # sent once per (receiving rank, key)
    return len(needed)


def _check_volumes(rank: int, group) -> None:
    P = dist.get_world_size(group)
    S = 32
    kv = lambda L: 2 * B * L * HKV * D * E  # noqa: E731  K and V shards, bytes
    got, L = _run(group, S, "plain", "ring")
    assert got["ring.fwd"] == (P - 1) * kv(L)
    assert got["ring.bwd"] == (P - 1) * kv(L) + P * kv(L)
    got, L = _run(group, S, "dca", "allgather", chunk_size=7, local_size=2)
    assert got["allgather.fwd"] == got["allgather.bwd"] == (P - 1) * kv(L)
    for Hkv in (2, 1):  # Hkv = 1 < P: K/V heads replicated P / Hkv times
        got, L = _run(group, S, "coca", "a2a", Hkv=Hkv)
        rep = max(1, P // Hkv)
        volume = (2 * B * L * H * D + 2 * B * L * Hkv * rep * D) * E * (P - 1) // P
        assert got["a2a.fwd"] == got["a2a.bwd"] == volume
    W = 4
    halo = []
    for S_ in (32, 64):  # slices of >= W - 1 keys: one neighbour slice per slice start
        got, L = _run(group, S_, "window", "halo", window=W)
        keys = (W - 1) * ((rank < P - 1) + (rank > 0))
        assert got.get("halo.fwd", 0) == keys * 2 * HKV * D * E, (S_, got)
        assert got.get("halo.bwd", 0) == got.get("halo.fwd", 0)
        halo.append(got.get("halo.fwd", 0))
    assert halo[0] == halo[1]  # independent of S
    doc_ids = torch.tensor([[0] * 5 + [1] * 19 + [2] * 2])  # documents shorter than a slice
    for layout, window in (("zigzag", 6), ("contiguous", 3)):
        lay = make_layout(layout, 26, P, doc_ids=doc_ids)
        got, _ = _run(group, 26, "window", "halo", layout=layout, doc_ids=doc_ids, window=window)
        assert got.get("halo.fwd", 0) == _halo_oracle(lay, rank, window) * 2 * HKV * D * E
    got, _ = _run(group, S, "chunked", "local", chunk=S // (2 * P))
    assert got == {}
    got, _ = _run(group, S, "chunked", "halo", chunk=S // (2 * P))
    assert got == {}  # aligned chunks: the halo plan sends nothing either


@pytest.mark.parametrize("world_size", [2, 4])
def test_bytes_sent_equal_analytic_volume(world_size: int, tmp_path) -> None:
    run_distributed(_check_volumes, world_size, tmp_path)


def _errors(P: int):
    """(method, plan, layout kind, shapes (S, H, Hkv), expected message) per refusal."""
    h_bad = 6 if P == 4 else 3  # H not divisible by P
    plain, dca = make_method("plain"), make_method("dca", chunk_size=7, local_size=2)
    return [
        (plain, "a2a", "zigzag", (16, h_bad, h_bad // 3), f"H={h_bad} is not divisible by CP={P}"),
        (plain, "a2a", "zigzag", (16, 12, 3), f"cannot split Hkv=3 KV heads over CP={P}"),
        (plain, "halo", "zigzag", (16, 4, 2), "plan='halo' cannot honour plain attention"),
        (dca, "local", "zigzag", (16, 4, 2), "plan='local' cannot honour dca attention"),
        (make_method("coca"), "halo", "zigzag", (16, 4, 2),
         "plan='halo' cannot honour coca attention"),
        (make_method("window", window=3), "local", "zigzag", (16, 4, 2),
         "plan='local' cannot honour window attention with window=3, chunk=None: rank"),
        (make_method("chunked", chunk=3), "local", "zigzag", (16, 4, 2),
         "plan='local' cannot honour chunked attention with window=None, chunk=3: rank"),
        (plain, "p2p", "zigzag", (16, 4, 2), "plan='p2p'"),
        (plain, None, "name", (2 * P + P, 4, 2), "must be even"),
    ]  # fmt: skip


def _check_errors(rank: int, group) -> None:
    P = dist.get_world_size(group)
    for method, plan, layout, (S, h, hkv), match in _errors(P):
        L = S // P
        q, k = torch.randn(1, L, h, D), torch.randn(1, L, hkv, D)
        lay = "zigzag" if layout == "name" else make_layout(layout, S, P)
        with pytest.raises(ValueError, match=match):
            cp_attn_func(q, k, k, group=group, method=method, plan=plan, layout=lay)
    lay = make_layout("zigzag", 20, P)  # shards of another length than the layout's
    with pytest.raises(ValueError, match="does not match"):
        cp_attn_func(*[torch.randn(1, lay.local_len + 2, 2, D)] * 3, group=group,
                     method=make_method("plain"), layout=lay)  # fmt: skip
    with pytest.raises(ValueError, match="layout.world_size"):
        cp_attn_func(*[torch.randn(1, 4, 2, D)] * 3, group=group, method=make_method("plain"),
                     layout=make_layout("zigzag", 8, P + 1))  # fmt: skip


def test_method_refusals() -> None:
    """Bad method arguments are refused when the method is built (no process group needed)."""
    with pytest.raises(ValueError, match="window=0; expected None or an int >= 1"):
        make_method("window", window=0)
    with pytest.raises(ValueError, match="those masks are causal"):
        make_method("chunked", chunk=2, causal=False)
    with pytest.raises(ValueError, match="form='loose'"):
        make_method("coca", form="loose")
    with pytest.raises(ValueError, match="local_size=7"):
        make_method("dca", chunk_size=7, local_size=7)


@pytest.mark.parametrize("world_size", [2, 4])
def test_refusals_raise_on_every_rank(world_size: int, tmp_path) -> None:
    run_distributed(_check_errors, world_size, tmp_path)
