"""Per-row key intervals on the Triton kernels (CP blocks and DCA passes on a GPU).

Under the Triton interpreter on CPU (conftest sets ``TRITON_INTERPRET=1``; 16 x 16 tiles), with
the "triton" backend forced, the interval engine, ``block_attention`` (the CP block function)
and the DCA passes with packed documents must give what the torch tiles give, forward and
backward, including a gradient flowing into lse (what merging partial results needs). fp64:
1e-10 (the same sums in another order); fp32: 1e-5 (fp32 accumulation over <= 64 keys).

Also: the bounds the kernels read (``ops/triton/intervals.plan``) against a brute-force count,
and the cases the kernel cannot take (bounds that decrease over the rows, more rows than keys):
``plan`` says so, and a forced Triton run refuses with the reason instead of falling back.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.ops import block_attention, force_backend
from megatron_ext.ops.intervals import interval_attention
from megatron_ext.ops.triton import intervals as tri_int

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-5}


def _run(backend: str, fn, q, k, v, seed: int = 1):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    with force_backend(backend):
        out, lse = fn(q, k, v)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g, dtype=out.dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    live = torch.isfinite(lse)
    ((out * do).sum() + (torch.where(live, lse, 0) * dlse).sum()).backward()
    return [out, torch.where(live, lse, 0), q.grad, k.grad, v.grad]


def _compare(fn, q, k, v, tol):
    want = _run("torch_blockwise", fn, q, k, v)
    got = _run("triton", fn, q, k, v)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol, f"{name}: {err:.2e} > {tol}"


def _bounds(sq: int, sk: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotone intervals: empty rows first, then windows of 9 keys shifted by one per row,
    and a second 'document' starting at key 20 in batch row 1."""
    r = torch.arange(sq)
    lo = (r - 9).clamp(min=0).repeat(batch, 1)
    hi = (r + 5).clamp(max=sk).repeat(batch, 1)
    lo[:, :3] = hi[:, :3] = 0
    lo[1, 20:] = torch.maximum(lo[1, 20:], torch.tensor(20))
    return lo, hi


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("sq, sk, h, hkv, d", [(37, 45, 4, 2, 16), (1, 1, 2, 2, 32),
                                               (17, 17, 2, 1, 64)], ids=["gqa", "one", "d64"])
def test_interval_attention_matches_torch_tiles(dtype, sq, sk, h, hkv, d) -> None:
    q = torch.randn(2, sq, h, d, dtype=dtype)
    k, v = (torch.randn(2, sk, hkv, d, dtype=dtype) for _ in range(2))
    lo, hi = _bounds(sq, sk, 2)
    _compare(lambda q, k, v: interval_attention(q, k, v, lo, hi, softmax_scale=d**-0.5),
             q, k, v, TOL[dtype])


def test_block_attention_packed_shard_matches_torch_tiles() -> None:
    """A zigzag-like shard (two slices per document, documents inside the row) against keys of
    another shard: the CP ring's block call."""
    q = torch.randn(2, 24, 4, 16, dtype=F64)
    k, v = (torch.randn(2, 24, 2, 16, dtype=F64) for _ in range(2))
    q_pos = torch.tensor([list(range(0, 6)) + list(range(18, 24)) + list(range(0, 6))
                          + list(range(12, 18))] * 2)
    q_doc = torch.tensor([[0] * 12 + [1] * 12] * 2)
    k_pos = torch.tensor([list(range(6, 18)) + list(range(6, 12)) + [-1] * 6] * 2)
    k_doc = torch.tensor([[0] * 12 + [1] * 12] * 2)
    kw = {"q_positions": q_pos, "k_positions": k_pos, "q_doc_ids": q_doc, "k_doc_ids": k_doc}
    for mask in ({}, {"window": 5}, {"causal": False}):
        _compare(lambda q, k, v, m=mask: block_attention(q, k, v, **kw, **m), q, k, v, 1e-10)


def test_plan_bounds_are_the_rows_that_see_each_key() -> None:
    lo, hi = _bounds(37, 45, 2)
    p = tri_int.plan(lo, hi, batch=2, sk=45, device=torch.device("cpu"))
    first, end = (x.long() for x in p.cols)
    for b in range(2):
        for j in range(45):
            rows = [r for r in range(37) if lo[b, r] <= j < hi[b, r]]
            assert (first[b, j].item(), end[b, j].item()) == (
                (rows[0], rows[-1] + 1) if rows else (first[b, j].item(),) * 2
            )


def test_unsupported_bounds_are_refused_when_forced() -> None:
    lo = torch.tensor([[4, 0, 6]])  # decreasing: rows not in (document, position) order
    hi = torch.tensor([[8, 3, 9]])
    assert tri_int.plan(lo, hi, batch=1, sk=9, device=torch.device("cpu")) is None
    assert tri_int.plan(lo[:, :2], hi[:, :2], batch=1, sk=1, device=torch.device("cpu")) is None
    q = torch.randn(1, 3, 2, 16)
    k = torch.randn(1, 9, 2, 16)
    with force_backend("triton"), pytest.raises(ValueError, match="do not decrease over the rows"):
        interval_attention(q, k, k, lo, hi, softmax_scale=0.25)
