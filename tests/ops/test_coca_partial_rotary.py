"""CoCA with partial rotary, as the GPT-NeoX release computes it (``rotary_pct`` < 1).

Oracle written from the release's semantics, independent of the package's RoPE and prologue
code: tau = ReLU((t[:D/2] + t[D/2:]) / 2) from the whole head, duplicated to D dims; only the
first r = D * rotary_pct dims of q and of that T are rotated (rotate-half pairs (i, i + r/2),
angles computed here from scratch), the rest pass through; the score is
sum_d q_d T'_jd q'_d / sqrt(D) over all D dims. ``coca_attn_func`` (prologue + attention) and
``coca_attn_ref`` must both match it in fp64 (1e-10), forward and dq/dt/dv, with packed
documents and GQA; rotary_dim = D must equal the full-head fast path; the strict form refuses a
partial rotary (the release has none).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.ops import coca_attn_func, coca_attn_ref

F64 = torch.float64


def _rot(x: torch.Tensor, pos: torch.Tensor, r: int, theta: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, r, 2, dtype=F64) / r)
    ang = pos.to(F64)[..., None] * inv
    c, s = torch.cos(ang)[:, :, None], torch.sin(ang)[:, :, None]
    x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., r:]), -1)


def _oracle(q, t, v, doc_ids, r):
    B, S, H, D = q.shape
    rep = H // t.shape[2]
    starts = torch.ones(B, S, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run = starts.long().cumsum(1)
    idx = torch.arange(S).expand(B, S)
    pos = idx - torch.where(starts, idx, 0).cummax(1).values
    tau = torch.relu((t[..., : D // 2] + t[..., D // 2 :]) / 2)
    T = torch.cat((tau, tau), -1)
    q_r, T_r = _rot(q, pos, r), _rot(T, pos, r).repeat_interleave(rep, 2)
    z = torch.einsum("bmhd,bnhd,bmhd->bhmn", q, T_r, q_r) / math.sqrt(D)
    vis = torch.ones(S, S, dtype=torch.bool).tril() & (run[:, :, None] == run[:, None, :])
    p = torch.softmax(z.masked_fill(~vis[:, None], float("-inf")), -1)
    return torch.einsum("bhmn,bnhd->bmhd", p, v.repeat_interleave(rep, 2))


def _grads(fn, q, t, v, dout):
    q, t, v = (x.detach().clone().requires_grad_() for x in (q, t, v))
    out = fn(q, t, v)
    out.backward(dout)
    return [out.detach(), q.grad, t.grad, v.grad]


@pytest.mark.parametrize("r", [8, 12, 4])
def test_partial_rotary_matches_release(r: int) -> None:
    B, S, H, Hkv, D = 2, 21, 4, 2, 16
    q = torch.randn(B, S, H, D, dtype=F64)
    t, v = (torch.randn(B, S, Hkv, D, dtype=F64) for _ in range(2))
    dout = torch.randn(B, S, H, D, dtype=F64)
    ids = torch.tensor([[0] * 8 + [1] * 13, [4] * 21])
    want = _grads(lambda q, t, v: _oracle(q, t, v, ids, r), q, t, v, dout)
    for fn in (coca_attn_func, coca_attn_ref):
        got = _grads(lambda q, t, v, fn=fn: fn(q, t, v, doc_ids=ids, rotary_dim=r), q, t, v, dout)
        for name, a, b in zip(("out", "dq", "dt", "dv"), got, want):
            assert (a - b).abs().max().item() <= 1e-10, (fn.__name__, name)


def test_full_rotary_dim_is_the_fast_path() -> None:
    q, t, v = (torch.randn(1, 9, 2, 16, dtype=F64) for _ in range(3))
    assert torch.equal(coca_attn_func(q, t, v, rotary_dim=16), coca_attn_func(q, t, v))


def test_strict_refuses_partial() -> None:
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="rotary_dim=8 < D=16 with form='strict'"):
        coca_attn_func(q, q, q, form="strict", rotary_dim=8)
    with pytest.raises(ValueError, match="rotary_dim=7; expected an even int"):
        coca_attn_func(q, q, q, rotary_dim=7)
