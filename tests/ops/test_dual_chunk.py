"""Dual Chunk Attention: the pass-based op against the dense pair-by-pair definition.

Compared: ``dual_chunk_attn_func`` and ``dual_chunk_block`` (three passes, exact merge) with
``dual_chunk_attn_ref`` (one softmax over a logit matrix built from the position rule), in out,
lse and the gradients of q, k, v under a random dout *and* a random dlse; the reference with
plain causal RoPE attention where ops/dual_chunk/README.md says DCA reduces to it; chunked
prefill and decode rows with full-prefill rows; packed documents with separate runs; temperature
with a rescaled softmax; the block function on key blocks (split, unordered, padded, in the future)
merged against the full result. Checks D1-D6 of docs/methods/checks.md, on both tile kernels
(fused CPU and plain torch).

Tolerances: fp64 1e-10 — both sides are the same maths in a different order, so only rounding
(~1e-15 observed) separates them; fp32 1e-5 — the op spec, with logits O(1) and tiny shapes;
bf16 — the checks.md rule (at most twice the error of the reference fed the same bf16 inputs, plus
1e-3; gradients 1e-2 relative). Negative tests (the README counter-example, the released
detached merge) must differ by far more than any rounding (> 1e-3 / > 1e-2).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.ops import (
    apply_rope,
    attention_ref,
    dual_chunk_attn_func,
    dual_chunk_attn_ref,
    merge_attn_outputs,
)
from megatron_ext.ops.backend import ENV_VAR
from megatron_ext.ops.dual_chunk import (
    dca_key_ranges,
    dca_position_rule,
    dca_rotate_keys,
    dca_rotate_queries,
    dca_temperature,
    dual_chunk_block,
    interval_attention,
)
from megatron_ext.ops.dual_chunk.rotary import rotate

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-5}


def _qkv(B, Sq, Sk, H, Hkv, D, dtype):
    q = torch.randn(B, Sq, H, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=True)
    return q, k, v


def _fwd_bwd(fn, q, k, v, do, dlse, **kw):
    """(out, lse, dq, dk, dv) with loss <out, do> + <lse, dlse>."""
    out, lse = fn(q, k, v, return_lse=True, **kw)
    loss = (out * do).sum() + (lse * dlse).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def _assert_close(got, want, tol, names=("out", "lse", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol, f"{name}: max abs error {err:.3e} > {tol:.0e}"


# ---------------------------------------------------------------- D3: the position rule


@pytest.mark.parametrize(
    "M, W",
    [
        pytest.param(9, 3, id="paper-fig2-C6-M9"),
        pytest.param(12, 3, id="C9"),
        pytest.param(7, 0, id="W0"),
        pytest.param(7, 6, id="C1"),
        pytest.param(30, 20, id="C10-W-gt-C"),
    ],
)
def test_position_rule_distances(M, W):
    C = M - W
    i = torch.arange(5 * C + 3)
    pos_q, pos_k = dca_position_rule(i, i, chunk_size=M, local_size=W)
    d = pos_q - pos_k.unsqueeze(0)
    ii, jj = i[:, None].expand_as(d), i[None, :].expand_as(d)
    vis = jj <= ii
    delta = ii // C - jj // C
    assert int(d[vis].min()) >= 0 and int(d[vis].max()) <= M
    intra = vis & (delta == 0)
    assert torch.equal(d[intra], (ii - jj)[intra])
    succ = vis & (delta == 1)
    want_succ = torch.where(ii % C <= W, ii - jj, M - jj % C)
    # min(C + i mod C, M) - j mod C: exact distance until the query clamps at M
    assert torch.equal(d[succ], torch.minimum(want_succ, M - jj % C)[succ])
    if C > W:  # then the clamp is the only thing separating the two closed forms
        assert torch.equal(d[succ], want_succ[succ])
    inter = vis & (delta >= 2)
    assert torch.equal(d[inter], (min(2 * C - 1, M) - jj % C)[inter])


def test_position_rule_llama2_defaults():
    """Llama-2 ChunkLlama defaults at N = 8192: distances span exactly [0, 3072]."""
    i = torch.arange(0, 8192, 7)
    pos_q, pos_k = dca_position_rule(i, i, chunk_size=3072, local_size=512)
    d = (pos_q - pos_k)[i[None, :] <= i[:, None]]
    assert int(d.min()) == 0 and int(d.max()) == 3072


# ---------------------------------------------------------------- D1: identities


def _plain_rope_attn(q, k, v, q_offset=0):
    qp = torch.arange(q_offset, q_offset + q.shape[1])
    return attention_ref(
        apply_rope(q, qp), apply_rope(k, torch.arange(k.shape[1])), v, q_offset=q_offset
    )


@pytest.mark.parametrize(
    "S, M, W, H, Hkv, q_offset",
    [
        pytest.param(16, 20, 4, 2, 2, 0, id="C-ge-S"),
        pytest.param(17, 40, 23, 4, 2, 0, id="C-eq-S-gqa"),
        pytest.param(20, 21, 11, 2, 1, 0, id="S-le-2C-W-ge-C-1"),
        pytest.param(19, 19, 9, 2, 2, 5, id="S-le-2C-W-eq-C-1-offset"),
    ],
)
def test_identity_plain_causal(S, M, W, H, Hkv, q_offset):
    q, k, v = _qkv(2, S - q_offset, S, H, Hkv, 16, F64)
    want_o, want_l = _plain_rope_attn(q, k, v, q_offset)
    for fn in (dual_chunk_attn_ref, dual_chunk_attn_func):
        o, lse = fn(q, k, v, chunk_size=M, local_size=W, q_offset=q_offset, return_lse=True)
        _assert_close((o, lse), (want_o, want_l), 1e-10)


def test_chunk_size_ge_n_is_not_enough():
    """README counter-example: N = 23, M = 30, W = 20 (C = 10) is not plain attention."""
    q, k, v = _qkv(1, 23, 23, 2, 2, 16, F64)
    want, _ = _plain_rope_attn(q, k, v)
    for fn in (dual_chunk_attn_ref, dual_chunk_attn_func):
        err = (fn(q, k, v, chunk_size=30, local_size=20) - want).abs().max().item()
        assert err > 1e-2


# ---------------------------------------------------------------- D2 / D4: fast vs reference

CASES = [  # B, Sq, Sk, H, Hkv, D, M, W, q_offset
    pytest.param(1, 1, 1, 2, 2, 64, 8, 2, 0, id="S1"),
    pytest.param(1, 37, 37, 2, 2, 64, 12, 3, 0, id="odd-S-C9"),
    pytest.param(2, 23, 23, 4, 1, 64, 7, 2, 0, id="gqa4-batch2-C5"),
    pytest.param(1, 29, 29, 2, 1, 128, 10, 0, 0, id="D128-W0"),
    pytest.param(1, 11, 11, 2, 2, 64, 4, 3, 0, id="C1"),
    pytest.param(2, 13, 40, 4, 2, 64, 12, 3, 27, id="offset-straddles-chunk"),
    pytest.param(1, 1, 40, 4, 2, 64, 12, 3, 39, id="decode"),
    pytest.param(1, 30, 30, 2, 2, 64, 30, 20, 0, id="C10-W-gt-C"),
]


@pytest.mark.parametrize("dtype", [pytest.param(F64, id="fp64"), pytest.param(F32, id="fp32")])
@pytest.mark.parametrize("B, Sq, Sk, H, Hkv, D, M, W, q_offset", CASES)
def test_fwd_bwd_matches_ref(B, Sq, Sk, H, Hkv, D, M, W, q_offset, dtype):
    q, k, v = _qkv(B, Sq, Sk, H, Hkv, D, dtype)
    do = torch.randn(B, Sq, H, D, dtype=dtype)
    dlse = torch.randn(B, H, Sq, dtype=dtype)
    kw = dict(chunk_size=M, local_size=W, q_offset=q_offset)
    want = _fwd_bwd(dual_chunk_attn_ref, q, k, v, do, dlse, **kw)
    got = _fwd_bwd(dual_chunk_attn_func, q, k, v, do, dlse, **kw)
    _assert_close(got, want, TOL[dtype])


def test_bf16_within_twice_low_precision_error():
    """bf16 fast path vs fp64 reference: at most 2x the error of the reference fed bf16 inputs
    (+1e-3), gradients within 1e-2 relative (docs/methods/checks.md bf16 rule)."""
    q, k, v = _qkv(2, 45, 45, 4, 2, 64, F64)
    do, dlse = torch.randn(2, 45, 4, 64, dtype=F64), torch.randn(2, 4, 45, dtype=F64)
    kw = dict(chunk_size=14, local_size=4)
    ref = _fwd_bwd(dual_chunk_attn_ref, q, k, v, do, dlse, **kw)
    bf = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    low = dual_chunk_attn_ref(*bf, return_lse=True, **kw)
    got = _fwd_bwd(dual_chunk_attn_func, *bf, do.bfloat16(), dlse.float(), **kw)
    for name, g, lo, r in zip(("out", "lse"), got, low, ref):
        err, base = (g.double() - r).abs().max(), (lo.double() - r).abs().max()
        assert err <= 2 * base + 1e-3, f"{name}: {err:.2e} > 2 * {base:.2e} + 1e-3"
    for name, g, r in zip(("dq", "dk", "dv"), got[2:], ref[2:]):
        rel = ((g.double() - r).norm() / r.norm()).item()
        assert rel <= 1e-2, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize(
    "B, Sq, Sk, H, Hkv, D, M, W, q_offset",
    [CASES[1], CASES[2], CASES[5]],
)
def test_torch_tiles_path_matches_ref(B, Sq, Sk, H, Hkv, D, M, W, q_offset, monkeypatch):
    """The plain-torch tile kernel (the path used off CPU) gives the same answers."""
    monkeypatch.setenv(ENV_VAR, "torch_blockwise")
    q, k, v = _qkv(B, Sq, Sk, H, Hkv, D, F64)
    do, dlse = torch.randn(B, Sq, H, D, dtype=F64), torch.randn(B, H, Sq, dtype=F64)
    kw = dict(chunk_size=M, local_size=W, q_offset=q_offset)
    want = _fwd_bwd(dual_chunk_attn_ref, q, k, v, do, dlse, **kw)
    _assert_close(_fwd_bwd(dual_chunk_attn_func, q, k, v, do, dlse, **kw), want, 1e-10)


def test_rotate_matches_apply_rope():
    """The DCA rotation helper equals apply_rope, values and gradients (fp64)."""
    x = torch.randn(2, 9, 3, 16, dtype=F64, requires_grad=True)
    g = torch.randn(2, 9, 3, 16, dtype=F64)
    for pos in (torch.arange(9) * 7, torch.full((9,), 5), torch.randint(0, 50, (2, 9))):
        a, b = rotate(x, pos), apply_rope(x, pos)
        _assert_close((a, *torch.autograd.grad(a, x, g)), (b, *torch.autograd.grad(b, x, g)), 1e-12)


def _released_merge(outs, lses):
    """ChunkLlama-style merge: correct forward, weights detached (no bf16 cast here, so the
    difference below is the detach alone)."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(
        o * torch.exp(s - lse).detach().transpose(1, 2)[..., None] for o, s in zip(outs, lses)
    )
    return out, lse


def _three_passes_then(merge):
    """DCA as three differentiable interval passes (one per query copy) merged by ``merge``."""

    def fn(q, k, v, *, chunk_size, local_size, return_lse):
        pos = torch.arange(q.shape[1])
        kw = dict(chunk_size=chunk_size, local_size=local_size)
        k_rot = dca_rotate_keys(k, pos, **kw)
        order, ranges = dca_key_ranges(pos, pos, **kw)
        assert order is None
        parts = [
            interval_attention(qx, k_rot, v, lo, hi, softmax_scale=q.shape[-1] ** -0.5)
            for qx, (lo, hi) in zip(dca_rotate_queries(q, pos, **kw), ranges)
        ]
        return merge([p[0] for p in parts], [p[1] for p in parts])

    return fn


def test_detached_merge_gives_wrong_grads():
    """The exact merge of the three passes gives the reference gradients; the released
    detached-weight merge keeps the forward (and dv, which has no D-term) but breaks dq, dk."""
    q, k, v = _qkv(1, 30, 30, 2, 2, 64, F64)
    do = torch.randn(1, 30, 2, 64, dtype=F64)
    dlse = torch.zeros(1, 2, 30, dtype=F64)
    kw = dict(chunk_size=12, local_size=3)
    want = _fwd_bwd(dual_chunk_attn_ref, q, k, v, do, dlse, **kw)
    exact = _fwd_bwd(_three_passes_then(merge_attn_outputs), q, k, v, do, dlse, **kw)
    _assert_close(exact, want, 1e-10)
    got = _fwd_bwd(_three_passes_then(_released_merge), q, k, v, do, dlse, **kw)
    _assert_close((*got[:2], got[4]), (*want[:2], want[4]), 1e-10, ("out", "lse", "dv"))
    for name, a, b in zip(("dq", "dk"), got[2:4], want[2:4]):
        assert (a - b).abs().max().item() > 1e-3, f"detached merge left {name} exact"


# ---------------------------------------------------------------- D5: chunked prefill, decode


@pytest.mark.parametrize(
    "splits",
    [
        pytest.param([40], id="decode-last"),
        pytest.param([17, 40], id="tail-from-17"),
        pytest.param([5, 22, 39, 40], id="prefill-in-4-then-decode"),
    ],
)
def test_chunked_prefill_equals_full(splits):
    S, kw = 41, dict(chunk_size=12, local_size=3, original_max_position_embeddings=8, seq_len=41)
    q, k, v = _qkv(2, S, S, 4, 2, 64, F32)
    full_o, full_l = dual_chunk_attn_func(q, k, v, return_lse=True, **kw)
    starts = [0, *splits]
    for a, b in zip(starts, [*splits, S]):
        o, lse = dual_chunk_attn_func(
            q[:, a:b], k[:, :b], v[:, :b], q_offset=a, return_lse=True, **kw
        )
        _assert_close((o, lse), (full_o[:, a:b], full_l[:, :, a:b]), 1e-5)


# ---------------------------------------------------------------- D6: temperature


def test_temperature_values():
    assert dca_temperature(1_010_000, 262_144) == pytest.approx(1.13488, abs=1e-5)
    assert dca_temperature(4096, 4096) == 1.0
    assert dca_temperature(100, 4096) == 1.0
    assert dca_temperature(10**6, None) == 1.0 and dca_temperature(10**6, 0) == 1.0


@pytest.mark.parametrize("fn", [dual_chunk_attn_func, dual_chunk_attn_ref], ids=["func", "ref"])
def test_temperature_scales_logits(fn):
    S, L_o, kw = 40, 8, dict(chunk_size=12, local_size=3)
    q, k, v = _qkv(1, S, S, 2, 1, 64, F64)
    t = 0.1 * math.log(S / L_o) + 1.0
    o, lse = fn(q, k, v, original_max_position_embeddings=L_o, return_lse=True, **kw)
    want = dual_chunk_attn_ref(q, k, v, softmax_scale=t**2 / 8.0, return_lse=True, **kw)
    _assert_close((o, lse), want, 1e-12)
    plain = dual_chunk_attn_ref(q, k, v, return_lse=True, **kw)
    assert (o - plain[0]).abs().max().item() > 1e-3  # the temperature did something
    o1, l1 = fn(q, k, v, original_max_position_embeddings=S, return_lse=True, **kw)
    _assert_close((o1, l1), plain, 1e-12)  # L <= L_o: T = 1


# ---------------------------------------------------------------- packed documents


@pytest.mark.parametrize("L_o", [pytest.param(None, id="no-temp"), pytest.param(8, id="temp")])
def test_packed_docs_equal_separate_runs(L_o):
    lens = [[10, 17, 13], [40]]
    doc_ids = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lens])
    q, k, v = _qkv(2, 40, 40, 4, 2, 64, F64)
    kw = dict(chunk_size=8, local_size=3, original_max_position_embeddings=L_o)
    do, dlse = torch.randn(2, 40, 4, 64, dtype=F64), torch.randn(2, 4, 40, dtype=F64)
    got = _fwd_bwd(dual_chunk_attn_func, q, k, v, do, dlse, doc_ids=doc_ids, **kw)
    _assert_close(
        got, _fwd_bwd(dual_chunk_attn_ref, q, k, v, do, dlse, doc_ids=doc_ids, **kw), 1e-10
    )
    for b, row in enumerate(lens):
        a = 0
        for n in row:
            s = slice(a, a + n)
            o, lse = dual_chunk_attn_func(
                q[b : b + 1, s], k[b : b + 1, s], v[b : b + 1, s], return_lse=True, **kw
            )
            _assert_close((o, lse), (got[0][b : b + 1, s], got[1][b : b + 1, :, s]), 1e-10)
            a += n


# ---------------------------------------------------------------- block function (for CP)


def _block_split(q, k, v, q_pos, k_pos, cuts, q_doc=None, k_doc=None, **kw):
    """Run dual_chunk_block on key blocks [cuts[i], cuts[i+1]) and merge."""
    k_rot = dca_rotate_keys(k, k_pos, chunk_size=kw["chunk_size"], local_size=kw["local_size"])
    outs, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        o, lse = dual_chunk_block(
            q,
            k_rot[:, a:b],
            v[:, a:b],
            q_positions=q_pos,
            k_positions=k_pos[..., a:b],
            q_doc_ids=q_doc,
            k_doc_ids=None if k_doc is None else k_doc[:, a:b],
            **kw,
        )
        outs.append(o)
        lses.append(lse)
    return merge_attn_outputs(outs, lses)


@pytest.mark.parametrize(
    "cuts",
    [pytest.param([0, 13, 31], id="2-blocks"), pytest.param([0, 4, 20, 31], id="3-blocks")],
)
def test_block_split_keys_merge_equals_full(cuts):
    """Zigzag-like queries (two position segments) against keys cut at non-chunk offsets."""
    S, kw = 31, dict(chunk_size=9, local_size=2, temperature=1.1)
    q, k, v = _qkv(2, S, S, 4, 2, 64, F64)
    rows = torch.cat((torch.arange(3, 9), torch.arange(22, 31)))  # shard of two slices
    do = torch.randn(2, len(rows), 4, 64, dtype=F64)
    dlse = torch.randn(2, 4, len(rows), dtype=F64)
    t = 1.1
    want = _fwd_bwd(
        lambda q, k, v, **a: tuple(
            x[:, rows] if x.dim() == 4 else x[:, :, rows]
            for x in dual_chunk_attn_ref(q, k, v, softmax_scale=t**2 / 8.0, **a)
        ),
        q, k, v, do, dlse, chunk_size=9, local_size=2,
    )  # fmt: skip

    def blocked(q, k, v, return_lse):
        return _block_split(q[:, rows], k, v, rows, torch.arange(S), cuts, **kw)

    _assert_close(_fwd_bwd(blocked, q, k, v, do, dlse), want, 1e-10)


def test_block_unsorted_keys():
    """A key block given in any order (with docs) equals the same block sorted."""
    doc = torch.tensor([[0] * 9 + [1] * 15])
    pos = torch.cat((torch.arange(9), torch.arange(15)))[None]
    q, k, v = _qkv(1, 24, 24, 2, 1, 64, F64)
    kw = dict(chunk_size=7, local_size=2)
    want = dual_chunk_attn_ref(q, k, v, doc_ids=doc, return_lse=True, **kw)
    perm = torch.randperm(24)
    k_rot = dca_rotate_keys(k, pos, **kw)
    got = dual_chunk_block(
        q, k_rot[:, perm], v[:, perm], q_positions=pos, k_positions=pos[:, perm],
        q_doc_ids=doc, k_doc_ids=doc[:, perm], **kw,
    )  # fmt: skip
    _assert_close(got, want, 1e-10)


def test_block_padding_tokens():
    """Padding (negative positions) inside query and key blocks: padded keys are invisible,
    padded queries give out 0 / lse -inf, and no gradient reaches padded tokens."""
    doc = torch.tensor([0] * 9 + [1] * 15)
    pos = torch.cat((torch.arange(9), torch.arange(15)))
    q, k, v = _qkv(1, 24, 24, 2, 1, 64, F64)
    kw = dict(chunk_size=7, local_size=2)
    do, dlse = torch.randn(1, 24, 2, 64, dtype=F64), torch.randn(1, 2, 24, dtype=F64)
    want = _fwd_bwd(dual_chunk_attn_ref, q, k, v, do, dlse, doc_ids=doc[None], **kw)
    keep = torch.tensor([3, 5, 12, 20])  # insert a padding token before each of these
    idx = torch.cat([torch.cat((torch.tensor([-1]), torch.tensor([i]))) if i in keep
                     else torch.tensor([i]) for i in range(24)])  # fmt: skip
    real = idx >= 0
    src = idx.clamp(min=0)
    pad_pos = torch.where(real, pos[src], torch.full_like(src, -1))
    pad_doc = doc[src]
    qp, kp, vp = (x.detach()[:, src].clone().requires_grad_() for x in (q, k, v))

    def padded(q, k, v, return_lse):
        k_rot = dca_rotate_keys(k, pad_pos, **kw)
        return dual_chunk_block(
            q, k_rot, v, q_positions=pad_pos, k_positions=pad_pos, q_doc_ids=pad_doc,
            k_doc_ids=pad_doc, **kw,
        )  # fmt: skip

    dop, dlsep = do[:, src].clone(), dlse[:, :, src].clone()
    got = _fwd_bwd(padded, qp, kp, vp, dop, dlsep)
    pick = [x[:, real] if x.dim() == 4 else x[:, :, real] for x in got]
    _assert_close(pick, want, 1e-10)
    assert bool((got[0][:, ~real] == 0).all()) and bool(torch.isneginf(got[1][:, :, ~real]).all())
    for g in got[2:]:
        assert bool((g[:, ~real] == 0).all())


def test_block_with_docs_and_future_keys():
    """Per-row positions and doc ids; a key block entirely after the queries gives 0 / -inf."""
    doc = torch.tensor([[0] * 9 + [1] * 15, [0] * 24])
    pos = torch.stack([torch.cat((torch.arange(9), torch.arange(15))), torch.arange(24)])
    q, k, v = _qkv(2, 24, 24, 2, 1, 64, F64)
    kw = dict(chunk_size=7, local_size=2)
    want = dual_chunk_attn_ref(q, k, v, doc_ids=doc, return_lse=True, **kw)
    got = _block_split(q, k, v, pos, pos, [0, 11, 24], doc, doc, **kw)
    _assert_close(got, want, 1e-10)
    k_rot = dca_rotate_keys(k, pos, **kw)
    o, lse = dual_chunk_block(
        q[:, :5], k_rot[:, 20:], v[:, 20:], q_positions=pos[:, :5], k_positions=pos[:, 20:],
        q_doc_ids=doc[:, :5], k_doc_ids=doc[:, 20:], **kw,
    )  # fmt: skip
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "kw, match",
    [
        pytest.param(dict(chunk_size=8, local_size=8), "local_size", id="W-eq-M"),
        pytest.param(dict(chunk_size=8, local_size=-1), "local_size", id="W-negative"),
        pytest.param(dict(chunk_size=0, local_size=0), "chunk_size", id="M-zero"),
        pytest.param(dict(chunk_size=8, local_size=2, q_offset=-1), "q_offset", id="offset"),
        pytest.param(
            dict(chunk_size=8, local_size=2, original_max_position_embeddings=-5),
            "original_max_position_embeddings",
            id="L_o",
        ),
        pytest.param(
            dict(chunk_size=8, local_size=2, q_offset=3), "q_offset", id="queries-past-keys"
        ),
        pytest.param(
            dict(chunk_size=8, local_size=2, doc_ids=torch.zeros(1, 5, dtype=torch.long)),
            "doc_ids",
            id="doc-ids-shape",
        ),
    ],
)
def test_bad_arguments_raise(kw, match):
    q, k, v = _qkv(1, 6, 6, 2, 2, 8, F32)
    with pytest.raises(ValueError, match=match):
        dual_chunk_attn_func(q, k, v, **kw)


def test_bad_heads_raise():
    q, _, _ = _qkv(1, 6, 6, 3, 2, 8, F32)
    k = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="Hkv"):
        dual_chunk_attn_func(q, k, k, chunk_size=8, local_size=2)
