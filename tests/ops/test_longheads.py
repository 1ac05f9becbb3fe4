"""LongHeads prefill (ops/longheads/README.md; checks L1-L3 of docs/methods/checks.md).

Compared:
- L1: ``longheads_attn_func`` with S <= K*w against plain causal RoPE attention
  (``attention_ref`` on ``apply_rope``'d q, k): the identity of §4.
- L2: ``longheads_select`` against the rules (K sorted chunks, forced 0, a-1, a) and against an
  independent numpy stable argsort of the scores; re-laid distances in [0, K*w - 1].
- L3: the batched fast path against ``longheads_attn_ref``, a per-query loop that re-rotates every
  key at its slot (a different computation) on awkward shapes.
- The decode-facing pieces (summaries, select, selected_attn) run on keys 0..p only against
  prefill row p.
- Summaries: fast against the per-chunk reference, and blind to later chunks.

Tolerances: fp64 1e-10 and fp32 1e-5 (checks.md). Both sides rotate with fp64 angles in fp64,
so fp64 errors are rounding only (~1e-15); in fp32 the slot angles of the two forms round
differently (positions < 100, so < 1e-5 rad), well inside 1e-5 on outputs of size ~1. bf16
inputs use the §7 rule: error vs fp64 at most twice that of the reference run on bf16 + 1e-3.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from megatron_ext.ops import apply_rope
from megatron_ext.ops.attention_ref import attention_ref
from megatron_ext.ops.longheads import (
    longheads_attn_func,
    longheads_attn_ref,
    longheads_chunk_summaries,
    longheads_select,
    longheads_selected_attn,
    longheads_summaries_ref,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _qkv(B, S, H, Hkv, D, dtype=torch.float32):
    q = torch.randn(B, S, H, D, dtype=dtype)
    k = torch.randn(B, S, Hkv, D, dtype=dtype)
    v = torch.randn(B, S, Hkv, D, dtype=dtype)
    return q, k, v


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- L1: short sequences are plain causal RoPE attention --------------------------------------

L1_CASES = [
    # (B, S, H, Hkv, D, w, K, begin_selective_length, dtype)
    pytest.param(1, 20, 2, 2, 64, 4, 5, None, torch.float32, id="fp32-S=Kw"),
    pytest.param(2, 19, 4, 2, 64, 4, 5, 16, torch.float32, id="fp32-gqa-batch2-Bsel=(K-1)w"),
    pytest.param(1, 17, 2, 1, 128, 4, 5, 16, torch.float64, id="fp64-D128-one-selective-row"),
    pytest.param(2, 24, 4, 2, 64, 6, 4, 18, torch.float64, id="fp64-gqa-w6"),
    pytest.param(1, 1, 2, 2, 64, 4, 3, None, torch.float64, id="fp64-S=1"),
]


@pytest.mark.parametrize("B,S,H,Hkv,D,w,K,b_sel,dtype", L1_CASES)
def test_short_sequence_equals_causal_rope(B, S, H, Hkv, D, w, K, b_sel, dtype):
    q, k, v = _qkv(B, S, H, Hkv, D, dtype)
    pos = torch.arange(S)
    ref_out, ref_lse = attention_ref(apply_rope(q, pos), apply_rope(k, pos), v, causal=True)
    for selection in ("head", "group"):
        out, lse = longheads_attn_func(
            q,
            k,
            v,
            chunk_len=w,
            num_chunks=K,
            begin_selective_length=b_sel,
            selection=selection,
            return_lse=True,
            block_size=3,
        )
        assert out.dtype == dtype and lse.shape == (B, H, S)
        assert _max_err(out, ref_out) <= TOL[dtype]
        assert _max_err(lse, ref_lse) <= TOL[dtype]


# ---- L2: selection rules ----------------------------------------------------------------------


def _setup_selection(B=2, S=90, H=4, Hkv=2, D=32, w=6, K=5, dtype=torch.float64):
    q, k, v = _qkv(B, S, H, Hkv, D, dtype)
    r = longheads_chunk_summaries(q, k, v, chunk_len=w)
    rows = torch.arange(K * w, S)
    return q, r, rows


@pytest.mark.parametrize("selection", ["head", "group"])
def test_selection_rules_and_topk(selection):
    B, S, H, Hkv, D, w, K = 2, 90, 4, 2, 32, 6, 5
    q, r, rows = _setup_selection(B, S, H, Hkv, D, w, K)
    chunks = longheads_select(
        q[:, rows], r, rows, chunk_len=w, num_chunks=K, selection=selection, num_kv_heads=Hkv
    )
    assert chunks.shape == (B, H, len(rows), K) and chunks.dtype == torch.int64
    a = (rows // w).view(1, 1, -1)
    assert (chunks.diff(dim=-1) > 0).all()  # exactly K distinct, sorted
    assert (chunks[..., 0] == 0).all()
    assert (chunks[..., -2] == a - 1).all() and (chunks[..., -1] == a).all()

    # Free chunks = top-(K-3) of 1..a-2 by <q_p, r_c> (group: mean over the group's heads).
    scores = np.einsum("bnhd,bchd->bhnc", q[:, rows].numpy(), r.numpy())
    if selection == "group":
        scores = scores.reshape(B, Hkv, H // Hkv, len(rows), -1).mean(axis=2)
        scores = np.repeat(scores, H // Hkv, axis=1)
    for b in range(B):
        for h in range(H):
            for i, p in enumerate(rows.tolist()):
                a_p = p // w
                cand = np.arange(1, a_p - 1)
                order = np.argsort(-scores[b, h, i, cand], kind="stable")
                expect = sorted(cand[order[: K - 3]].tolist())
                assert chunks[b, h, i, 1:-2].tolist() == expect

    # Re-laid distances: query slot (K-1)w + p mod w, key slot t*w + j mod w over visible keys.
    n, off = len(rows), torch.arange(w)
    p = rows.view(1, 1, n, 1, 1)
    q_slot = (K - 1) * w + p % w
    k_slot = torch.arange(K).view(1, 1, 1, K, 1) * w + off
    visible = torch.ones(1, 1, n, K, w, dtype=torch.bool)
    visible[..., -1, :] = off <= (rows % w).view(n, 1)
    visible = visible.expand(B, H, n, K, w)
    dist = (q_slot - k_slot).expand(B, H, n, K, w)[visible]
    assert dist.min().item() == 0 and dist.max().item() == K * w - 1
    key_pos = chunks.unsqueeze(-1) * w + off  # original positions of the gathered keys
    assert (key_pos.expand(B, H, n, K, w)[visible] <= p.expand(B, H, n, K, w)[visible]).all()
    # Inside the own chunk the re-laid distance is the original one.
    own = visible[..., -1, :]
    assert torch.equal(
        (p[..., 0] - key_pos[..., -1, :]).expand(B, H, n, w)[own],
        (q_slot[..., 0] - k_slot[..., -1, :]).expand(B, H, n, w)[own],
    )


def test_group_selection_is_shared_and_differs_from_head():
    Hkv, w, K = 2, 6, 5
    q, r, rows = _setup_selection(Hkv=Hkv, w=w, K=K)
    kw = {"chunk_len": w, "num_chunks": K, "num_kv_heads": Hkv}
    grp = longheads_select(q[:, rows], r, rows, selection="group", **kw)
    head = longheads_select(q[:, rows], r, rows, selection="head", **kw)
    assert torch.equal(grp[:, 0::2], grp[:, 1::2])  # heads (0, 1) and (2, 3) share a KV head
    assert not torch.equal(grp, head)
    assert not torch.equal(head[:, 0::2], head[:, 1::2])


def test_ties_go_to_lower_chunk():
    B, H, D, w, K, nc = 1, 2, 8, 4, 6, 12
    # Small integers make every dot product exact, so equal summaries give bit-equal scores.
    q = torch.randint(1, 4, (B, 1, H, D)).double()
    r = torch.randint(-1, 3, (B, 1, H, D)).double().expand(B, nc, H, D).clone()
    r[..., 0] = 10.0  # common score > 0
    r[:, 9] *= 2.0  # chunk 9 scores twice as high
    pos = torch.tensor([13 * w + 1])  # a = 13, free candidates 1..11, K - 3 = 3 free slots
    chunks = longheads_select(q, r, pos, chunk_len=w, num_chunks=K)
    assert chunks[0, :, 0].tolist() == [[0, 1, 2, 9, 12, 13]] * H


# ---- L3: batched form vs the per-query literal reference --------------------------------------

L3_CASES = [
    # (B, S, H, Hkv, D, w, K, b_sel, selection, block, dtype)
    pytest.param(1, 61, 2, 2, 64, 4, 4, None, "head", 16, torch.float32, id="S-not-multiple-of-w"),
    pytest.param(1, 57, 2, 1, 64, 4, 4, None, "head", 10, torch.float64, id="last-chunk-one-token"),
    pytest.param(1, 60, 2, 2, 64, 5, 4, None, "head", 7, torch.float64, id="S-multiple-of-w"),
    pytest.param(1, 53, 4, 2, 64, 4, 4, None, "head", 9, torch.float64, id="gqa-head"),
    pytest.param(1, 53, 4, 2, 64, 4, 4, None, "group", 9, torch.float64, id="gqa-group"),
    pytest.param(2, 70, 4, 2, 64, 6, 5, None, "head", 13, torch.float32, id="gqa-batch2-fp32"),
    pytest.param(2, 45, 2, 1, 128, 4, 4, 23, "group", 5, torch.float64, id="D128-Bsel-odd"),
    pytest.param(1, 40, 2, 2, 128, 1, 6, None, "head", 100, torch.float32, id="w=1-block>S"),
    pytest.param(1, 50, 2, 2, 64, 5, 3, None, "head", 1, torch.float64, id="K=3-block=1"),
    pytest.param(1, 97, 2, 2, 64, 8, 5, None, "head", None, torch.float32, id="default-block"),
]


@pytest.fixture(params=["union", "gather"])
def chunk_path(request, monkeypatch):
    """Run the test on one of the two ways of attending the selected chunks, and check that
    only that one ran: through the block's union of chunks, or by per-query gather."""
    import megatron_ext.ops.longheads.interface as lh

    monkeypatch.setattr(lh, "_use_union", lambda *a, _u=request.param == "union": _u)
    calls = {"union": 0, "gather": 0}
    for name in calls:
        fn = getattr(lh, f"_{name}_attend")

        def counted(*a, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*a)

        monkeypatch.setattr(lh, f"_{name}_attend", counted)
    yield request.param
    other = "gather" if request.param == "union" else "union"
    assert calls[request.param] > 0 and calls[other] == 0, calls


@pytest.mark.parametrize("U,n,K,D,want", [
    (7, 128, 4, 64, True),     # chunked prefill on the scorecard model
    (64, 256, 16, 64, True),
    (65, 256, 16, 64, False),  # more distinct chunks than D
    (8, 1, 8, 64, False),      # decode: each chunk read by one query
    (8, 64, 8, 16, False),     # D = 16: the union is no faster there
])
def test_union_rule(U, n, K, D, want):
    import megatron_ext.ops.longheads.interface as lh

    assert lh._use_union(U, n, K, D) is want


@pytest.mark.parametrize("B,S,H,Hkv,D,w,K,b_sel,selection,block,dtype", L3_CASES)
def test_matches_per_query_reference(
    B, S, H, Hkv, D, w, K, b_sel, selection, block, dtype, chunk_path
):
    q, k, v = _qkv(B, S, H, Hkv, D, dtype)
    if B == 2:
        assert not torch.allclose(q[0], q[1])  # batch rows carry different contents
    kw = {
        "chunk_len": w,
        "num_chunks": K,
        "begin_selective_length": b_sel,
        "selection": selection,
        "return_lse": True,
    }
    out, lse = longheads_attn_func(q, k, v, block_size=block, **kw)
    ref_out, ref_lse = longheads_attn_ref(q, k, v, **kw)
    assert not out.isnan().any() and not lse.isnan().any()
    assert _max_err(out, ref_out) <= TOL[dtype]
    assert _max_err(lse, ref_lse) <= TOL[dtype]
    # The selective rows must really differ from plain causal attention (not a vacuous check).
    pos = torch.arange(S)
    causal, _ = attention_ref(apply_rope(q, pos), apply_rope(k, pos), v, causal=True)
    assert _max_err(out[:, -1], causal[:, -1]) > 1e-3


def test_bf16_error_budget():
    B, S, H, Hkv, D, w, K = 1, 48, 2, 2, 64, 4, 4
    q, k, v = _qkv(B, S, H, Hkv, D, torch.bfloat16)
    kw = {"chunk_len": w, "num_chunks": K}
    gold = longheads_attn_ref(q.double(), k.double(), v.double(), **kw)
    low = longheads_attn_ref(q, k, v, **kw)
    out = longheads_attn_func(q, k, v, block_size=8, **kw)
    assert out.dtype == torch.bfloat16
    assert _max_err(out, gold) <= 2 * _max_err(low, gold) + 1e-3


def test_grad_mode_on_still_runs():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 30, 2, 2, 16))
    out = longheads_attn_func(q, k, v, chunk_len=4, num_chunks=4)
    ref = longheads_attn_ref(q, k, v, chunk_len=4, num_chunks=4)
    assert not out.requires_grad
    assert _max_err(out, ref) <= 1e-5


@pytest.mark.parametrize("selection", ["head", "group"])
def test_pieces_on_a_prefix_equal_prefill_rows(selection, chunk_path):
    """Summaries + select + selected_attn on keys 0..p only (as decode would) == prefill row p."""
    B, S, H, Hkv, D, w, K = 2, 50, 4, 2, 32, 4, 4
    q, k, v = _qkv(B, S, H, Hkv, D, torch.float64)
    out, lse = longheads_attn_func(
        q, k, v, chunk_len=w, num_chunks=K, selection=selection, return_lse=True
    )
    for p in (K * w, 33, 35, S - 1):
        qs, ks, vs = q[:, : p + 1], k[:, : p + 1], v[:, : p + 1]
        pos = torch.tensor([p])
        r = longheads_chunk_summaries(qs, ks, vs, chunk_len=w)
        chunks = longheads_select(
            q[:, p : p + 1],
            r,
            pos,
            chunk_len=w,
            num_chunks=K,
            selection=selection,
            num_kv_heads=Hkv,
        )
        k_local = apply_rope(ks, torch.arange(p + 1) % w)
        o, ls = longheads_selected_attn(q[:, p : p + 1], k_local, vs, chunks, pos, chunk_len=w)
        assert _max_err(o, out[:, p : p + 1]) <= 1e-10
        assert _max_err(ls, lse[:, :, p : p + 1]) <= 1e-10


# ---- Summaries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [None, 2 * 2 * 4 * 5 * 5], ids=["one-block", "2-chunk-blocks"])
def test_summaries_match_reference(budget, monkeypatch):
    if budget is not None:  # force the chunk-block loop to run in blocks of 2 chunks
        monkeypatch.setattr("megatron_ext.ops.longheads.selection._SUMMARY_BUDGET", budget)
    q, k, v = _qkv(2, 27, 4, 2, 16, torch.float64)
    r = longheads_chunk_summaries(q, k, v, chunk_len=5)
    r_ref = longheads_summaries_ref(q, k, v, chunk_len=5)
    assert r.shape == (2, 5, 4, 16)
    assert _max_err(r, r_ref) <= 1e-10


def test_summaries_and_selection_ignore_later_chunks():
    B, S, H, Hkv, D, w, K = 2, 72, 4, 2, 32, 4, 4
    cut = 11 * w  # perturb every token from chunk 11 on
    q, k, v = _qkv(B, S, H, Hkv, D, torch.float64)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, cut:] += torch.randn_like(x[:, cut:])
    r = longheads_chunk_summaries(q, k, v, chunk_len=w)
    r2 = longheads_chunk_summaries(q2, k2, v2, chunk_len=w)
    assert _max_err(r[:, :11], r2[:, :11]) <= 1e-12
    assert _max_err(r[:, 11:], r2[:, 11:]) > 1e-3

    rows = torch.arange(K * w, cut)
    kw = {"chunk_len": w, "num_chunks": K, "selection": "group", "num_kv_heads": Hkv}
    sel = longheads_select(q[:, rows], r, rows, **kw)
    sel2 = longheads_select(q2[:, rows], r2, rows, **kw)
    assert torch.equal(sel, sel2)
    # And the whole op is causal: rows before the cut do not move.
    out = longheads_attn_func(q, k, v, chunk_len=w, num_chunks=K, block_size=6)
    out2 = longheads_attn_func(q2, k2, v2, chunk_len=w, num_chunks=K, block_size=6)
    assert _max_err(out[:, :cut], out2[:, :cut]) <= 1e-12
    assert _max_err(out[:, cut:], out2[:, cut:]) > 1e-3


# ---- Bad inputs ---------------------------------------------------------------------------------

BAD_ARGS = [
    pytest.param({"num_chunks": 2}, (2, 2), "num_chunks=2", id="num_chunks<3"),
    pytest.param({"chunk_len": 0}, (2, 2), "chunk_len=0", id="chunk_len<1"),
    pytest.param({"begin_selective_length": 11}, (2, 2), "begin_selective_length=11", id="b_sel"),
    pytest.param({"selection": "token"}, (2, 2), "selection='token'", id="selection"),
    pytest.param({}, (3, 2), "H % Hkv", id="gqa-ratio"),
]


@pytest.mark.parametrize("fn", [longheads_attn_func, longheads_attn_ref], ids=["func", "ref"])
@pytest.mark.parametrize("kwargs,heads,match", BAD_ARGS)
def test_bad_arguments_raise(fn, kwargs, heads, match):
    q = torch.randn(1, 20, heads[0], 8)
    k = v = torch.randn(1, 20, heads[1], 8)
    kw = {"chunk_len": 4, "num_chunks": 4, **kwargs}
    with pytest.raises(ValueError, match=re.escape(match)):
        fn(q, k, v, **kw)


def test_bad_shapes_and_block_raise():
    q, k, v = _qkv(1, 20, 2, 2, 8)
    with pytest.raises(ValueError, match="block_size=0"):
        longheads_attn_func(q, k, v, chunk_len=4, num_chunks=4, block_size=0)
    with pytest.raises(ValueError, match="head dim D=7"):
        longheads_attn_func(q[..., :7], k[..., :7], v[..., :7], chunk_len=4, num_chunks=4)
    with pytest.raises(ValueError, match="v.shape"):
        longheads_attn_func(q, k, v[:, :10], chunk_len=4, num_chunks=4)
    r = longheads_chunk_summaries(q, k, v, chunk_len=4)
    with pytest.raises(ValueError, match="positions span chunks 2..2"):
        longheads_select(q[:, 8:9], r, torch.tensor([8]), chunk_len=4, num_chunks=4)
    with pytest.raises(ValueError, match="num_kv_heads=None"):
        longheads_select(
            q[:, 19:], r, torch.tensor([19]), chunk_len=4, num_chunks=4, selection="group"
        )


def test_documents_are_independent() -> None:
    """Packed documents (``doc_ids``): each document is its own sequence (positions from 0, its
    own chunk grid, first chunk and local window), so no chunk of another document is ever
    selected. Oracle: the dense reference run on each document alone (fp64, 1e-10)."""
    w, K = 4, 3
    lens = [7, 23, 18]  # a short document (plain attention only) and two that select chunks
    S, B, H, Hkv, D = sum(lens), 2, 4, 2, 16
    q = torch.randn(B, S, H, D, dtype=torch.float64)
    k, v = (torch.randn(B, S, Hkv, D, dtype=torch.float64) for _ in range(2))
    ids = torch.tensor([sum([[i] * n for i, n in enumerate(lens)], []), [9] * S])
    out, lse = longheads_attn_func(q, k, v, chunk_len=w, num_chunks=K, doc_ids=ids,
                                   return_lse=True)
    starts = [0, 7, 30, S]
    for s0, s1 in zip(starts[:-1], starts[1:]):
        o, l_ = longheads_attn_ref(q[:1, s0:s1], k[:1, s0:s1], v[:1, s0:s1], chunk_len=w,
                                   num_chunks=K, return_lse=True)
        torch.testing.assert_close(out[:1, s0:s1], o, atol=1e-10, rtol=0)
        torch.testing.assert_close(lse[:1, :, s0:s1], l_, atol=1e-10, rtol=0)
    whole = longheads_attn_ref(q[1:], k[1:], v[1:], chunk_len=w, num_chunks=K)
    torch.testing.assert_close(out[1:], whole, atol=1e-10, rtol=0)
    mixed = longheads_attn_func(q[:1], k[:1], v[:1], chunk_len=w, num_chunks=K)
    assert (mixed[:, 30:] - out[:1, 30:]).abs().max() > 1e-3  # documents really were cut
