"""ChunkLlama's knobs on DCA: position interpolation, mscale, partial rotary.

Oracle (written from the release's semantics, independent of the package's RoPE code): every
chunk-local position p (the keys' j mod C, the intra / successive / inter query positions) is
rotated at the fractional position p / scaling_factor; cos and sin are multiplied by
mscale = 1 + 0.05 ln(extension_factor) when that is > 1 (q and k each carry it, so logits carry
mscale^2); only the first rotary_dim dims of each head rotate. ``dual_chunk_attn_func`` must
match it in fp64 (1e-10: the same maths, different order), forward and dq/dk/dv, with packed
documents and GQA; scaling_factor = 1 with extension_factor <= 1 must reduce to plain DCA
exactly; the two knobs that do the same thing (scaling_factor and a RoPE scaling) are refused
together. Context parallelism with the knobs: tests/parallel/test_cp_knobs.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.ops import RopeScaling, dual_chunk_attn_func
from megatron_ext.ops.dual_chunk import dca_position_rule

F64 = torch.float64


def _rot(x: torch.Tensor, pos: torch.Tensor, r: int, theta: float, s: float, m: float):
    """Rotate-half RoPE of the first r dims of x [B, S, H, D] at fractional positions pos / s."""
    inv = 1.0 / theta ** (torch.arange(0, r, 2, dtype=F64) / r)
    ang = (pos.to(F64) / s)[..., None] * inv  # [B, S, r/2]
    c, sn = (torch.cos(ang) * m)[:, :, None], (torch.sin(ang) * m)[:, :, None]
    x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    return torch.cat((x1 * c - x2 * sn, x2 * c + x1 * sn, rest), -1)


def _oracle(q, k, v, doc_ids, *, M, W, s, f, r, theta=10000.0):
    B, S, H, D = q.shape
    m = 1 + 0.05 * math.log(f) if f is not None and f > 1 else 1.0
    run = torch.cumsum(torch.cat([torch.ones(B, 1, dtype=torch.long),
                                  (doc_ids[:, 1:] != doc_ids[:, :-1]).long()], 1), 1)
    first = torch.stack([torch.searchsorted(run[b], run[b]) for b in range(B)])
    pos = torch.arange(S).expand(B, S) - first
    pos_q, pos_k = dca_position_rule(pos, pos, chunk_size=M, local_size=W)
    rep = H // k.shape[2]
    kr = _rot(k, pos_k, r, theta, s, m).repeat_interleave(rep, 2)
    z = torch.zeros(B, H, S, S, dtype=F64)
    for p in pos_q.unique().tolist():
        qr = _rot(q, torch.full((B, S), p), r, theta, s, m)
        z = torch.where((pos_q == p)[:, None], torch.einsum("bihd,bjhd->bhij", qr, kr), z)
    # pass-through dims (r < D) carry no mscale: the release scales only the cos/sin tables
    vis = torch.ones(S, S, dtype=torch.bool).tril() & (run[:, :, None] == run[:, None, :])
    z = z / math.sqrt(D)
    p_attn = torch.softmax(z.masked_fill(~vis[:, None], float("-inf")), -1)
    return torch.einsum("bhij,bjhd->bihd", p_attn, v.repeat_interleave(rep, 2))


def _grads(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("s, f, r", [(2.0, None, 16), (1.0, 4.0, 16), (3.0, 8.0, 8),
                                     (1.0, None, 8)],
                         ids=["pi", "mscale", "pi-mscale-partial", "partial"])
def test_matches_release_semantics(s: float, f: float | None, r: int) -> None:
    B, S, H, Hkv, D = 2, 29, 4, 2, 16
    q = torch.randn(B, S, H, D, dtype=F64)
    k, v = (torch.randn(B, S, Hkv, D, dtype=F64) for _ in range(2))
    dout = torch.randn(B, S, H, D, dtype=F64)
    ids = torch.tensor([[0] * 11 + [1] * 18, [2] * 29])
    kw = {"chunk_size": 9, "local_size": 2}
    got = _grads(lambda q, k, v: dual_chunk_attn_func(
        q, k, v, doc_ids=ids, scaling_factor=s, extension_factor=f, rotary_dim=r, **kw),
        q, k, v, dout)  # fmt: skip
    want = _grads(lambda q, k, v: _oracle(q, k, v, ids, M=9, W=2, s=s, f=f, r=r), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a - b).abs().max().item() <= 1e-10, name


def test_neutral_knobs_are_plain_dca() -> None:
    q, k, v = (torch.randn(1, 23, 2, 16, dtype=F64) for _ in range(3))
    base = dual_chunk_attn_func(q, k, v, chunk_size=8, local_size=3)
    same = dual_chunk_attn_func(q, k, v, chunk_size=8, local_size=3, scaling_factor=1.0,
                                extension_factor=0.5, rotary_dim=16)
    assert torch.equal(base, same)
    moved = dual_chunk_attn_func(q, k, v, chunk_size=8, local_size=3, extension_factor=4.0)
    assert (moved - base).abs().max().item() > 1e-3  # the knob is not a no-op


def test_refusals() -> None:
    q = torch.randn(1, 5, 2, 16)
    with pytest.raises(ValueError, match="scaling_factor=2.0 with RoPE scaling 'linear'"):
        dual_chunk_attn_func(q, q, q, chunk_size=4, local_size=1, scaling_factor=2.0,
                             rope_scaling=RopeScaling("linear", 2.0))
    with pytest.raises(ValueError, match="scaling_factor=0"):
        dual_chunk_attn_func(q, q, q, chunk_size=4, local_size=1, scaling_factor=0)
    with pytest.raises(ValueError, match="rotary_dim=7 for head dim D=16"):
        dual_chunk_attn_func(q, q, q, chunk_size=4, local_size=1, rotary_dim=7)
