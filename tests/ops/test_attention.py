"""Attention ops: attention_ref against independent oracles, attention_func against attention_ref.

1. ``attention_ref`` (fp64) against a per-row loop written from the mask definitions of
   docs/methods/conventions.md, and against torch SDPA with an explicit boolean mask: 1e-12, since
   all three are the same fp64 sums in different orders.
2. ``attention_func`` on every backend path (fused CPU kernel on the whole problem, blockwise
   planner on the fused kernel, blockwise planner in plain torch) against ``attention_ref``, in
   out, lse, dq, dk, dv with a random dout AND a random dlse. fp64 to 1e-10 (docs/methods/checks.md;
   observed ~1e-14), fp32 to 1e-5 against the fp64 reference, bf16 by the low-precision-baseline
   rule (error <= 2x that of the same maths in bf16, + 1e-3).
3. H1 identities, the O(S*W) block plan, argument validation, and the flash-attn plumbing
   with a CPU stand-in for flash-attn.

Rows with no visible key: with causal masks every query sees itself, so such rows only come
from an empty key set (non-causal Sk = 0) and inside individual tiles (window fringes, document
boundaries), both covered here. NaN-poisoned ``torch.empty`` is on (conftest).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import megatron_ext.ops.attention as attn_mod
from megatron_ext.ops import attention_func, attention_ref
from megatron_ext.ops.blockwise import plan_blocks, visible_ranges

F64 = torch.float64


def _docs(B: int, S: int, cuts: list[list[int]]) -> torch.Tensor:
    ids = torch.zeros(B, S, dtype=torch.long)
    for b, row in enumerate(cuts):
        for n, c in enumerate(row):
            ids[b, c:] = n + 1
    return ids


def _inputs(B, Sq, Sk, H, Hkv, D, dtype=F64):
    mk = lambda *s: torch.randn(*s, dtype=F64).to(dtype).requires_grad_()  # noqa: E731
    return mk(B, Sq, H, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D)


def _loop_oracle(q, k, v, *, causal, window, chunk, q_offset, doc_ids):
    """Per (b, h, row) softmax over the keys the rules of docs/methods/conventions.md allow."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    out = torch.zeros(B, Sq, H, D, dtype=F64)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=F64)
    for b in range(B):
        doc, pos = [0] * Sk, list(range(Sk))
        if doc_ids is not None:
            ids = doc_ids[b].tolist()
            for j in range(1, Sk):
                same = ids[j] == ids[j - 1]
                doc[j], pos[j] = (doc[j - 1], pos[j - 1] + 1) if same else (doc[j - 1] + 1, 0)
        for r in range(Sq):
            i = q_offset + r

            def ok(j: int, i: int = i, doc: list = doc, pos: list = pos) -> bool:
                if causal and j > i or window is not None and j <= i - window:
                    return False
                if doc_ids is not None and doc[j] != doc[i]:
                    return False
                return chunk is None or pos[i] // chunk == pos[j] // chunk

            js = [j for j in range(Sk) if ok(j)]
            if not js:
                continue
            for h in range(H):
                g = h // (H // Hkv)
                z = k[b, js, g].double() @ q[b, r, h].double() / D**0.5
                lse[b, h, r] = torch.logsumexp(z, 0)
                out[b, r, h] = torch.softmax(z, 0) @ v[b, js, g].double()
    return out, lse


ORACLE_CASES = [
    pytest.param(2, 9, 9, 4, 2, {}, id="causal-gqa"),
    pytest.param(1, 9, 9, 2, 2, dict(causal=False), id="full"),
    pytest.param(2, 5, 12, 6, 1, dict(q_offset=4), id="qoffset-mid"),
    pytest.param(1, 12, 12, 2, 1, dict(window=3), id="window3"),
    pytest.param(1, 12, 12, 2, 1, dict(chunk=5), id="chunk5"),
    pytest.param(2, 12, 12, 2, 1, dict(doc_ids=[[4, 9], [1]]), id="docs"),
    pytest.param(2, 12, 12, 2, 1, dict(doc_ids=[[4, 9], [1]], causal=False), id="docs-full"),
    pytest.param(2, 6, 14, 2, 1, dict(doc_ids=[[3, 10], [9]], chunk=3, q_offset=8),
                 id="docs-chunk-qoff"),
    pytest.param(1, 3, 0, 2, 1, dict(causal=False), id="empty-keys"),
]  # fmt: skip


def _kw(B: int, Sk: int, kw: dict) -> dict:
    kw = {"causal": True, "window": None, "chunk": None, "q_offset": 0, "doc_ids": None, **kw}
    if kw["doc_ids"] is not None:
        kw["doc_ids"] = _docs(B, Sk, kw["doc_ids"])
    return kw


@pytest.mark.parametrize("B, Sq, Sk, H, Hkv, kw", ORACLE_CASES)
def test_ref_matches_loop_oracle(B, Sq, Sk, H, Hkv, kw) -> None:
    kw = _kw(B, Sk, kw)
    q, k, v = _inputs(B, Sq, Sk, H, Hkv, 8)
    out, lse = attention_ref(q, k, v, **kw)
    o_ref, l_ref = _loop_oracle(q.detach(), k.detach(), v.detach(), **kw)
    torch.testing.assert_close(out, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, l_ref, rtol=0, atol=1e-12)  # equal infinities required
    if Sk == 0:
        assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_ref_matches_sdpa_with_bool_mask() -> None:
    B, S, H, Hkv, D = 2, 50, 4, 2, 16
    doc_ids = _docs(B, S, [[13, 31], [40]])
    q, k, v = _inputs(B, S, S, H, Hkv, D)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    run = torch.stack([torch.unique_consecutive(d, return_inverse=True)[1] for d in doc_ids])
    mask = (j <= i) & (j > i - 20) & (run[:, :, None] == run[:, None, :])
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
        v.repeat_interleave(2, 2).transpose(1, 2), attn_mask=mask[:, None],
    ).transpose(1, 2)  # fmt: skip
    out, _ = attention_ref(q, k, v, window=20, doc_ids=doc_ids)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def _fwd_bwd(fn, q, k, v, g, gl, **kw):
    out, lse = fn(q, k, v, **kw)
    finite = torch.isfinite(lse)
    loss = (out.double() * g).sum() + (torch.where(finite, lse, 0).double() * gl).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


FUNC_CASES = [
    pytest.param(1, 1, 1, 2, 1, 64, {}, id="S1"),
    pytest.param(2, 113, 113, 4, 2, 64, {}, id="odd113-gqa"),
    pytest.param(1, 113, 113, 4, 4, 64, dict(causal=False), id="full-odd"),
    pytest.param(2, 1, 203, 4, 2, 64, dict(q_offset=202), id="decode-qoff"),
    pytest.param(1, 77, 300, 6, 1, 64, dict(q_offset=150), id="prefill-chunk-qoff-gqa6"),
    pytest.param(1, 130, 130, 2, 1, 128, {}, id="d128"),
    pytest.param(2, 3, 0, 4, 2, 64, dict(causal=False), id="empty-keys"),
    pytest.param(1, 300, 300, 4, 2, 64, dict(window=37), id="window37"),
    pytest.param(1, 600, 600, 2, 1, 64, dict(window=200), id="window200-pieces"),
    pytest.param(1, 300, 300, 2, 1, 64, dict(window=1), id="window1"),
    pytest.param(2, 257, 257, 4, 2, 64, dict(chunk=50), id="chunk50"),
    pytest.param(2, 300, 300, 4, 2, 64, dict(doc_ids=[[77, 150, 290], [200]]), id="docs-midblock"),
    pytest.param(2, 300, 300, 2, 1, 64, dict(doc_ids=[[77, 150], [200]], causal=False),
                 id="docs-full"),
    pytest.param(2, 100, 300, 4, 2, 64, dict(doc_ids=[[77, 230], [250]], chunk=40, window=25,
                                              q_offset=180), id="docs-chunk-window-qoff"),
]  # fmt: skip
PLAIN = {"S1", "odd113-gqa", "full-odd", "decode-qoff", "prefill-chunk-qoff-gqa6", "d128",
         "empty-keys"}  # fmt: skip
BACKENDS = ["cpu_fused", "cpu_blockwise", "torch_blockwise"]
FUNC_PARAMS = [
    pytest.param(*c.values, be, id=f"{c.id}-{be}")
    for c in FUNC_CASES
    for be in BACKENDS
    if be != "cpu_fused" or c.id in PLAIN
]


@pytest.mark.parametrize("B, Sq, Sk, H, Hkv, D, kw, backend", FUNC_PARAMS)
def test_func_matches_ref_fp64(B, Sq, Sk, H, Hkv, D, kw, backend) -> None:
    kw = _kw(B, Sk, kw)
    q, k, v = _inputs(B, Sq, Sk, H, Hkv, D)
    g, gl = torch.randn(B, Sq, H, D, dtype=F64), torch.randn(B, H, Sq, dtype=F64)
    want = _fwd_bwd(attention_ref, q, k, v, g, gl, **kw)
    got = _fwd_bwd(attention_func, q, k, v, g, gl, backend=backend, **kw)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


FP32_CASES = [c for c in FUNC_CASES if c.id in ("odd113-gqa", "window200-pieces", "docs-midblock")]


@pytest.mark.parametrize(
    "B, Sq, Sk, H, Hkv, D, kw, backend",
    [pytest.param(*c.values, be, id=f"{c.id}-{be}") for c in FP32_CASES for be in BACKENDS
     if be != "cpu_fused" or c.id in PLAIN],
)  # fmt: skip
def test_func_matches_ref_fp32(B, Sq, Sk, H, Hkv, D, kw, backend) -> None:
    kw = _kw(B, Sk, kw)
    q, k, v = _inputs(B, Sq, Sk, H, Hkv, D, dtype=torch.float32)
    g, gl = torch.randn(B, Sq, H, D, dtype=F64), torch.randn(B, H, Sq, dtype=F64)
    up = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = _fwd_bwd(attention_ref, *up, g, gl, **kw)
    got = _fwd_bwd(attention_func, q, k, v, g, gl, backend=backend, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_bf16_within_low_precision_baseline(backend: str) -> None:
    kw = _kw(1, 200, {} if backend == "cpu_fused" else dict(window=64))
    q, k, v = _inputs(1, 200, 200, 4, 2, 64, dtype=torch.bfloat16)
    g, gl = torch.randn(1, 200, 4, 64, dtype=F64), torch.randn(1, 4, 200, dtype=F64)
    up = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact = _fwd_bwd(attention_ref, *up, g, gl, **kw)
    # Same maths with bf16 logits and probabilities: the low-precision baseline.
    low = attention_ref(*(x.detach() for x in (q, k, v)), **kw)
    got = _fwd_bwd(attention_func, q, k, v, g, gl, backend=backend, **kw)
    err_low = (low[0].double() - exact[0]).abs().max()
    assert (got[0].double() - exact[0]).abs().max() <= 2 * err_low + 1e-3
    assert (got[1].double() - exact[1]).abs().max() <= 1e-3  # lse is accumulated in fp32
    for a, b in zip(got[2:], exact[2:]):
        assert (a.double() - b).norm() / b.norm() <= 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_only_gradient(backend: str) -> None:
    """Loss through lse alone: dout is None inside the backward, dlse carries everything."""
    q, k, v = _inputs(1, 70, 90, 4, 2, 32)
    kw = dict(q_offset=20) if backend == "cpu_fused" else dict(q_offset=20, window=30)
    want = torch.autograd.grad(attention_ref(q, k, v, **kw)[1].sum(), (q, k), allow_unused=True)
    got = torch.autograd.grad(attention_func(q, k, v, backend=backend, **kw)[1].sum(), (q, k, v))
    assert torch.equal(got[2], torch.zeros_like(v))  # lse does not depend on v
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["cpu_blockwise", "torch_blockwise"])
def test_h1_window_chunk_identities(backend: str) -> None:
    S = 150
    q, k, v = (x.detach() for x in _inputs(2, S, S, 4, 2, 64))
    causal = attention_func(q, k, v, backend=backend)
    for kw in (dict(window=S), dict(window=S + 7), dict(chunk=S), dict(chunk=4 * S)):
        for a, b in zip(attention_func(q, k, v, backend=backend, **kw), causal):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    out, lse = attention_func(q, k, v, window=1, backend=backend)
    assert torch.equal(out, v.repeat_interleave(2, dim=2))
    want_lse = torch.einsum("bshd,bshd->bhs", q, k.repeat_interleave(2, 2)) / 8.0
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-13)


def test_window_plan_visits_o_s_w_keys() -> None:
    S, W = 4096, 64
    lo, hi = visible_ranges(1, S, S, causal=True, window=W, chunk=None, q_offset=0, doc_ids=None)
    for bq in (128, 64):
        plan = plan_blocks(lo, hi, causal=True, q_offset=0, block_q=bq, block_k=512,
                           split_full=True)  # fmt: skip
        area = sum((b.r1 - b.r0) * (p.k1 - p.k0) for b in plan for p in b.pieces)
        assert S * W <= area <= S * (W + bq)  # vs S*S/2 for dense causal
    lo, hi = visible_ranges(1, S, S, causal=True, window=None, chunk=256, q_offset=0, doc_ids=None)
    plan = plan_blocks(lo, hi, causal=True, q_offset=0, block_q=128, block_k=512, split_full=False)
    assert all(p.k0 >= (b.r0 // 256) * 256 for b in plan for p in b.pieces)  # never past a chunk
    assert {p.kind for b in plan for p in b.pieces} == {"causal", "full"}


def _flash_standin(q, k, v, *, dropout_p, softmax_scale, causal, window_size, return_attn_probs):
    """flash_attn_func semantics on CPU: causal and window aligned bottom-right."""
    assert dropout_p == 0.0 and return_attn_probs
    off = k.shape[1] - q.shape[1]
    win = None if window_size == (-1, -1) else window_size[0] + 1
    out, lse = attention_ref(q, k, v, causal=causal, window=win, softmax_scale=softmax_scale,
                             q_offset=off if causal else 0)  # fmt: skip
    return out, lse, None


@pytest.mark.parametrize("with_dlse", [False, True], ids=["dout-only", "dout+dlse"])
def test_flash_backend_plumbing(monkeypatch: pytest.MonkeyPatch, with_dlse: bool) -> None:
    monkeypatch.setattr(attn_mod, "_load_flash_attn", lambda: _flash_standin)
    q, k, v = _inputs(2, 40, 100, 4, 2, 16)
    g = torch.randn(2, 40, 4, 16, dtype=F64)
    gl = torch.randn(2, 4, 40, dtype=F64) * with_dlse
    kw = dict(q_offset=50, window=30)
    want = _fwd_bwd(attention_ref, q, k, v, g, gl, **kw)
    got = _fwd_bwd(attention_func, q, k, v, g, gl, backend="flash_attn", **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _bad(**over):
    q, k, v = torch.zeros(2, 8, 4, 16), torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
    args = {"q": q, "k": k, "v": v, **{n: over.pop(n) for n in ("q", "k", "v") if n in over}}
    return lambda: attention_func(args["q"], args["k"], args["v"], **over)


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(_bad(k=torch.zeros(2, 8, 3, 16), v=torch.zeros(2, 8, 3, 16)), "H % Hkv",
                     id="gqa"),
        pytest.param(_bad(v=torch.zeros(2, 7, 2, 16)), "v.shape", id="kv-shape"),
        pytest.param(_bad(k=torch.zeros(2, 8, 2, 8), v=torch.zeros(2, 8, 2, 8)), "head dims",
                     id="D"),
        pytest.param(_bad(k=torch.zeros(1, 8, 2, 16), v=torch.zeros(1, 8, 2, 16)), "batch", id="B"),
        pytest.param(_bad(q=torch.zeros(8, 4, 16)), "q.shape", id="q-3d"),
        pytest.param(_bad(window=0), "window=0", id="window0"),
        pytest.param(_bad(chunk=0), "chunk=0", id="chunk0"),
        pytest.param(_bad(q_offset=-1), "q_offset=-1", id="qoff-neg"),
        pytest.param(_bad(q_offset=1), r"q_offset \+ Sq", id="qoff-too-big"),
        pytest.param(_bad(doc_ids=torch.zeros(2, 7, dtype=torch.long)), "doc_ids.shape", id="docs"),
        pytest.param(_bad(causal=False, window=4), "causal=False", id="noncausal-window"),
        pytest.param(_bad(window=4, backend="cpu_fused"), "cpu_fused", id="fused-window"),
        pytest.param(_bad(backend="cuda"), "backend='cuda'", id="backend"),
    ],
)  # fmt: skip
def test_bad_inputs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
