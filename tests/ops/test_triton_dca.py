"""Fused Triton Dual Chunk Attention against the dense DCA definition.

``dual_chunk_attn_func`` with the "triton" backend forced (one launch over all tile pairs,
query copy chosen per element by delta = i // C - j // C, one online softmax; dq_intra / dq_succ
/ dq_inter rotated back by autograd) is compared with ``dual_chunk_attn_ref`` (pair-by-pair
logits from the position rule, one softmax) in out, lse, dq, dk, dv, with a random dout AND a
random dlse. CPU runs the kernels under the Triton interpreter with 16 x 16 tiles, so chunk
lengths 1, 5, 9, 20 make tiles straddle chunk boundaries and mix two or three query variants;
on a CUDA machine the same cases run on the GPU (compiled kernels, GPU tile sizes).

Tolerances: fp64 1e-10 (checks.md, D2/D4; the kernel accumulates in fp64, observed ~1e-15);
fp32 1e-5 (checks.md, single ops: fp32 sums over <= 50 keys drift ~1e-6 from fp64).

GPU (``@pytest.mark.gpu``): bf16 at head dims 64 and 128, S up to 4096, by the checks.md
bf16 rule against ``_dca_dense`` in fp64 (a three-matmul form of the definition, itself checked
against ``dual_chunk_attn_ref`` here in fp64; the pair-by-pair reference needs one matmul per
distinct query position, too slow at these S): out and lse within 2x the error of the same
maths in bf16 + 1e-3, gradients within 1e-2 relative (norm) error. The same check also runs at
a tiny shape everywhere, so CPU CI exercises it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_ext.ops.backend import ENV_VAR
from megatron_ext.ops.dual_chunk import (
    dca_query_positions,
    dual_chunk_attn_func,
    dual_chunk_attn_ref,
    triton_dca,
)
from megatron_ext.ops.rope import apply_rope
from megatron_ext.ops.triton import interface as tri
from megatron_ext.ops.triton import triton_dca_attention

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-5}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fused(monkeypatch):
    """Force the fused path and count its calls."""
    calls = []
    real = triton_dca.dual_chunk_attn_triton

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setattr(triton_dca, "dual_chunk_attn_triton", spy)
    return calls


def _fwd_bwd(fn, q, k, v, do, dlse, **kw):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kw)
    grads = torch.autograd.grad((out, lse), (q, k, v), (do.to(out.dtype), dlse.to(lse.dtype)))
    return (out, lse, *grads)


def _check(B, Sq, Sk, H, Hkv, D, dtype, **kw):
    mk = lambda *s: torch.randn(*s, dtype=F64).to(DEV)  # noqa: E731
    q, k, v = mk(B, Sq, H, D).to(dtype), mk(B, Sk, Hkv, D).to(dtype), mk(B, Sk, Hkv, D).to(dtype)
    do, dlse = mk(B, Sq, H, D), mk(B, H, Sq)
    got = _fwd_bwd(dual_chunk_attn_func, q, k, v, do, dlse, **kw)
    want = _fwd_bwd(dual_chunk_attn_ref, q.to(F64), k.to(F64), v.to(F64), do, dlse, **kw)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        want_dtype = F32 if name == "lse" and dtype != F64 else dtype
        assert g.shape == w.shape and g.dtype == want_dtype, name
        assert not torch.isnan(g).any(), name
        err = (g.double() - w).abs().max().item()
        assert err <= TOL[dtype], f"{name}: max abs error {err:.3e} > {TOL[dtype]:.0e}"


CASES = [  # B, Sq, Sk, H, Hkv, D, M, W, extra kwargs
    pytest.param(1, 1, 1, 2, 2, 16, 8, 2, {}, id="S1"),
    pytest.param(1, 37, 37, 2, 2, 16, 12, 3, {}, id="odd-S-C9-straddling"),
    pytest.param(2, 23, 23, 4, 1, 32, 7, 2, {}, id="batch2-gqa4-C5"),
    pytest.param(1, 50, 50, 2, 1, 16, 24, 4, {}, id="C20-gt-tile"),
    pytest.param(1, 11, 11, 2, 2, 16, 4, 3, {}, id="C1"),
    pytest.param(2, 13, 40, 4, 2, 16, 12, 3, {"q_offset": 27}, id="offset-straddles-chunk"),
    pytest.param(1, 1, 40, 4, 2, 16, 12, 3, {"q_offset": 39}, id="decode"),
    pytest.param(1, 30, 30, 2, 2, 16, 30, 20, {}, id="C10-W-gt-C"),
    pytest.param(1, 30, 30, 2, 1, 16, 40, 5, {}, id="C-ge-S"),
    pytest.param(1, 37, 37, 2, 2, 16, 12, 3, {"original_max_position_embeddings": 8}, id="temp"),
    pytest.param(1, 9, 29, 2, 2, 16, 12, 3, {"q_offset": 20, "seq_len": 64}, id="seq-len"),
    pytest.param(1, 25, 25, 2, 1, 64, 10, 2, {}, id="D64"),
    pytest.param(1, 19, 19, 2, 2, 128, 9, 2, {}, id="D128"),
]


@pytest.mark.parametrize("dtype", [pytest.param(F64, id="fp64"), pytest.param(F32, id="fp32")])
@pytest.mark.parametrize("B, Sq, Sk, H, Hkv, D, M, W, kw", CASES)
def test_fused_matches_ref(B, Sq, Sk, H, Hkv, D, M, W, kw, dtype, fused):
    _check(B, Sq, Sk, H, Hkv, D, dtype, chunk_size=M, local_size=W, **kw)
    assert fused == [1]


@pytest.mark.parametrize(
    "blocks", [pytest.param((32, 16), id="tall"), pytest.param((16, 32), id="wide")]
)
def test_unequal_tiles(blocks, fused, monkeypatch):
    """BLOCK_M != BLOCK_N with chunk boundaries inside tiles of both axes."""
    monkeypatch.setattr(tri, "CPU_BLOCKS", blocks)
    _check(1, 41, 47, 2, 1, 16, F64, chunk_size=13, local_size=2, q_offset=6)


def test_auto_dispatch(monkeypatch):
    """CPU stays on the torch passes; CUDA without doc_ids takes the fused kernel."""
    monkeypatch.setattr(
        triton_dca, "dual_chunk_attn_triton", lambda *a, **k: pytest.fail("fused path taken")
    )
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    dual_chunk_attn_func(q, k, v, chunk_size=6, local_size=2)  # must not call the kernel

    def fake(dtype, D=64):  # use_triton reads is_cuda, device, dtype and shape
        return SimpleNamespace(
            is_cuda=True, device=torch.device("cuda"), dtype=dtype, shape=(1, 9, 2, D)
        )

    ids = torch.zeros(1, 9, dtype=torch.long)
    assert triton_dca.use_triton(fake(torch.bfloat16), None)
    assert triton_dca.use_triton(fake(torch.float16), None)
    assert not triton_dca.use_triton(fake(F32), None)
    assert not triton_dca.use_triton(fake(torch.bfloat16), ids)
    assert not triton_dca.use_triton(fake(torch.bfloat16, D=80), None)
    assert not triton_dca.use_triton(fake(F64), None)
    monkeypatch.setenv(ENV_VAR, "torch_blockwise")
    assert not triton_dca.use_triton(fake(torch.bfloat16), None)


def test_forced_with_doc_ids_takes_the_interval_kernel(monkeypatch):
    """Packed documents: the fused kernel cannot take them, so forced Triton runs the three
    passes on the Triton interval kernel; the answer is still the dense definition."""
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setattr(
        triton_dca, "dual_chunk_attn_triton", lambda *a, **k: pytest.fail("fused path taken")
    )
    q, k, v = (torch.randn(1, 29, 2, 16, dtype=F64) for _ in range(3))
    do, dlse = torch.randn(1, 29, 2, 16, dtype=F64), torch.randn(1, 2, 29, dtype=F64)
    ids = torch.tensor([[0] * 4 + [1] * 16 + [2] * 9])
    kw = {"chunk_size": 6, "local_size": 2, "doc_ids": ids}
    got = _fwd_bwd(dual_chunk_attn_func, q, k, v, do, dlse, **kw)
    want = _fwd_bwd(dual_chunk_attn_ref, q, k, v, do, dlse, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "shape_succ, chunk_len, match",
    [
        pytest.param((1, 8, 2, 16), 0, "chunk_len", id="chunk-len-0"),
        pytest.param((1, 7, 2, 16), 3, "q_succ", id="q-succ-shape"),
    ],
)
def test_core_bad_inputs_raise(shape_succ, chunk_len, match):
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match=match):
        triton_dca_attention(q, torch.randn(shape_succ), q, k, k, chunk_len=chunk_len,
                             softmax_scale=0.25)  # fmt: skip


# ----------------------------------------------------------------------------- bf16
def _dca_dense(q, k, v, *, chunk_size, local_size, return_lse=True):
    """DCA by definition with three matmuls: every logit from each query copy, picked by delta.

    All maths in the input dtype (fp64: the oracle; bf16: the low-precision baseline).
    """
    B, S, H, D = q.shape
    C = chunk_size - local_size
    pos = torch.arange(S, device=q.device)
    rep = H // k.shape[2]
    q_pos = dca_query_positions(pos, chunk_size=chunk_size, local_size=local_size)
    qs = [apply_rope(q, p, theta=1e4) for p in q_pos]
    kr = apply_rope(k, pos % C, theta=1e4).repeat_interleave(rep, dim=2)
    vr = v.repeat_interleave(rep, dim=2)
    delta = (pos // C)[:, None] - (pos // C)[None, :]
    z = [torch.einsum("bihd,bjhd->bhij", x, kr) for x in qs]
    z = torch.where(delta == 0, z[0], torch.where(delta == 1, z[1], z[2])) * D**-0.5
    z = z.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(z, -1), vr)
    return out, torch.logsumexp(z, -1)


def test_dense_oracle_matches_ref():
    """The GPU tests' oracle equals ``dual_chunk_attn_ref`` (fp64, 1e-12)."""
    q, k, v = torch.randn(2, 31, 4, 16, dtype=F64), *torch.randn(2, 2, 31, 2, 16, dtype=F64)
    do, dlse = torch.randn(2, 31, 4, 16, dtype=F64), torch.randn(2, 4, 31, dtype=F64)
    kw = {"chunk_size": 11, "local_size": 3}
    got = _fwd_bwd(_dca_dense, q, k, v, do, dlse, **kw)
    for g, w in zip(got, _fwd_bwd(dual_chunk_attn_ref, q, k, v, do, dlse, **kw)):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def check_bf16(B, S, H, Hkv, D, M, W, device):
    """docs/methods/checks.md bf16 rule for the fused DCA path (see the module docstring)."""
    mk = lambda *s: torch.randn(*s, dtype=F64, device=device).bfloat16()  # noqa: E731
    q, k, v, do = mk(B, S, H, D), mk(B, S, Hkv, D), mk(B, S, Hkv, D), mk(B, S, H, D)
    dlse = torch.randn(B, H, S, device=device)
    kw = {"chunk_size": M, "local_size": W}
    ref = _fwd_bwd(_dca_dense, q.to(F64), k.to(F64), v.to(F64), do.to(F64), dlse, **kw)
    low = _fwd_bwd(_dca_dense, q, k, v, do, dlse, **kw)
    got = _fwd_bwd(dual_chunk_attn_func, q, k, v, do, dlse, **kw)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == F32
    for name, g, lo, r in zip(("out", "lse"), got, low, ref):
        err, base = (g.double() - r).abs().max().item(), (lo.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-3, f"{name}: {err:.2e} > 2 * {base:.2e} + 1e-3"
    for name, g, r in zip(("dq", "dk", "dv"), got[2:], ref[2:]):
        assert not torch.isnan(g).any(), name
        rel = ((g.double() - r).norm() / r.norm()).item()
        assert rel <= 1e-2, f"{name}: relative error {rel:.2e}"


def test_bf16_rule_tiny(fused):
    check_bf16(1, 40, 2, 1, 32, 14, 3, DEV)
    assert fused == [1]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, S, H, Hkv, D, M, W",
    [
        pytest.param(2, 1024, 4, 4, 64, 300, 44, id="D64-S1024-C256"),
        pytest.param(1, 2048, 8, 2, 128, 700, 100, id="D128-S2048-C600-gqa4"),
        pytest.param(1, 4001, 4, 1, 64, 1100, 100, id="D64-S4001-C1000"),
        pytest.param(1, 4096, 4, 2, 128, 1536, 512, id="D128-S4096-C1024"),
    ],
)
def test_bf16_gpu(B, S, H, Hkv, D, M, W, monkeypatch):
    calls = []
    real = triton_dca.dual_chunk_attn_triton
    monkeypatch.setattr(
        triton_dca, "dual_chunk_attn_triton", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    check_bf16(B, S, H, Hkv, D, M, W, "cuda")
    assert calls == [1], "auto dispatch did not take the fused kernel on CUDA"
