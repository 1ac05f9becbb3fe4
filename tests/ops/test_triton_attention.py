"""Triton attention kernels (``ops/triton``) against the dense ``attention_ref``.

CPU (CI): the kernels run under the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``
before triton is imported) with 16 x 16 tiles, so S = 37 or 45 already crosses several tiles,
ragged edges, and the masked / unmasked tile split. On a CUDA machine the same cases run on the
GPU (compiled kernels, GPU tile sizes). Every case draws a random dout AND a random dlse and
compares out, lse, dq, dk, dv with ``attention_ref`` in fp64 on the same inputs:

- fp64 inputs: 1e-10 (docs/methods/checks.md; the kernel accumulates in fp64, observed ~1e-15);
- fp32 inputs: 1e-5 (checks.md, single ops): the kernel's fp32 sums over <= 64 keys of O(1)
  terms drift by ~1e-6 from the fp64 sums (observed <= 1.2e-6 on these shapes).

NaN-poisoned ``torch.empty`` is active (conftest), so any output element a kernel forgets to
write fails the comparison.

GPU (``@pytest.mark.gpu``, skipped on CPU): bf16 at head dims 64 and 128, S up to 4096, by the
checks.md bf16 rule: max error against the fp64 reference <= 2x that of the same maths done
in bf16 (bf16 matmuls and softmax) + 1e-3 for out and lse; gradients within 1e-2 relative
(norm) error. The same check also runs at a tiny shape everywhere, so CPU CI exercises it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import megatron_ext.ops.attention as attn_mod
from megatron_ext.ops import attention_func, attention_ref
from megatron_ext.ops.attention_ref import attention_mask
from megatron_ext.ops.backend import ENV_VAR
from megatron_ext.ops.triton import interface as tri
from megatron_ext.ops.triton import triton_attention

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-5}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _docs(B: int, S: int, cuts: list[list[int]]) -> torch.Tensor:
    ids = torch.zeros(B, S, dtype=torch.long)
    for b, row in enumerate(cuts):
        for n, c in enumerate(row):
            ids[b, c:] = n + 1
    return ids


def _fwd_bwd(fn, q, k, v, do, dlse, **kw):
    """(out, lse, dq, dk, dv) of fn on fresh leaves, with incoming gradients (do, dlse)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **kw)
    grads = torch.autograd.grad((out, lse), (q, k, v), (do.to(out.dtype), dlse.to(lse.dtype)))
    return (out, lse, *grads)


def _check(B, Sq, Sk, H, Hkv, D, dtype, fn=triton_attention, fn_kw=None, **kw):
    mk = lambda *s: torch.randn(*s, dtype=F64).to(DEV)  # noqa: E731
    q, k, v = mk(B, Sq, H, D).to(dtype), mk(B, Sk, Hkv, D).to(dtype), mk(B, Sk, Hkv, D).to(dtype)
    do, dlse = mk(B, Sq, H, D), mk(B, H, Sq)
    if kw.get("doc_ids") is not None:
        kw["doc_ids"] = kw["doc_ids"].to(DEV)
    got = _fwd_bwd(fn, q, k, v, do, dlse, **kw, **(fn_kw or {}))
    want = _fwd_bwd(attention_ref, q.to(F64), k.to(F64), v.to(F64), do, dlse, **kw)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and not torch.isnan(g).any(), name
        fin = torch.isfinite(w)
        assert torch.equal(fin, torch.isfinite(g)) and torch.equal(g[~fin].double(), w[~fin]), name
        err = (g.double()[fin] - w[fin]).abs().max().item() if fin.any() else 0.0
        assert err <= TOL[dtype], f"{name}: max abs error {err:.3e} > {TOL[dtype]:.0e}"


D2 = [[0, 10, 30], [0, 3]]  # document starts per batch row (row 0: three documents)
CASES = [
    pytest.param(1, 1, 1, 2, 2, 16, {}, id="S1"),
    pytest.param(1, 37, 37, 4, 2, 32, {}, id="odd-S-gqa2"),
    pytest.param(2, 45, 45, 4, 1, 16, {}, id="batch2-gqa4-ragged"),
    pytest.param(1, 13, 40, 2, 2, 16, {"q_offset": 27}, id="decode-block-bottom-right"),
    pytest.param(1, 9, 40, 2, 1, 16, {"q_offset": 10}, id="q-offset-middle"),
    pytest.param(1, 20, 33, 2, 2, 16, {"causal": False}, id="non-causal-Sq-lt-Sk"),
    pytest.param(2, 37, 37, 4, 2, 16, {"window": 5}, id="window5"),
    pytest.param(1, 50, 50, 2, 2, 16, {"window": 16}, id="window-eq-tile"),
    pytest.param(1, 22, 40, 2, 1, 16, {"window": 9, "q_offset": 18}, id="window-offset"),
    pytest.param(1, 37, 37, 2, 1, 16, {"chunk": 7}, id="chunk7"),
    pytest.param(2, 37, 37, 2, 1, 16, {"doc_ids": _docs(2, 37, D2)}, id="docs"),
    pytest.param(2, 37, 37, 2, 2, 16, {"doc_ids": _docs(2, 37, D2), "window": 6}, id="docs-win"),
    pytest.param(
        2, 37, 37, 2, 1, 16, {"doc_ids": _docs(2, 37, D2), "causal": False}, id="docs-noncausal"
    ),
    pytest.param(2, 17, 37, 2, 1, 16, {"doc_ids": _docs(2, 37, D2), "q_offset": 15}, id="docs-off"),
    pytest.param(1, 21, 21, 2, 1, 64, {}, id="D64"),
    pytest.param(1, 19, 19, 2, 2, 128, {"window": 7}, id="D128-window"),
]


@pytest.mark.parametrize("dtype", [pytest.param(F64, id="fp64"), pytest.param(F32, id="fp32")])
@pytest.mark.parametrize("B, Sq, Sk, H, Hkv, D, kw", CASES)
def test_fwd_bwd_matches_ref(B, Sq, Sk, H, Hkv, D, kw, dtype):
    _check(B, Sq, Sk, H, Hkv, D, dtype, **kw)


@pytest.mark.parametrize(
    "blocks", [pytest.param((32, 16), id="tall-tiles"), pytest.param((16, 32), id="wide-tiles")]
)
@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"q_offset": 7}, id="causal-offset"),
        pytest.param({"window": 11}, id="window"),
        pytest.param({"doc_ids": _docs(1, 47, [[0, 20]])}, id="docs"),
    ],
)
def test_unequal_tiles(blocks, kw, monkeypatch):
    """BLOCK_M != BLOCK_N: the tile-range arithmetic must not assume square tiles."""
    monkeypatch.setattr(tri, "CPU_BLOCKS", blocks)
    Sq = 47 - kw.get("q_offset", 0)
    _check(1, Sq, 47, 2, 1, 16, F64, **kw)


def test_window_one_returns_v():
    """H1: window = 1 sees only the query itself, so out_i = v_i exactly (up to rounding)."""
    q, k, v = (torch.randn(1, 23, 2, 16, dtype=F64, device=DEV) for _ in range(3))
    out, lse = triton_attention(q, k, v, window=1)
    torch.testing.assert_close(out, v, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, (q * k).sum(-1).transpose(1, 2) / 4, atol=1e-12, rtol=0)


def test_no_keys_gives_zero_and_minus_inf():
    """Non-causal with Sk = 0: out 0, lse -inf, zero (not NaN) gradients."""
    q = torch.randn(1, 5, 2, 16, device=DEV, requires_grad=True)
    k = torch.randn(1, 0, 2, 16, device=DEV, requires_grad=True)
    v = torch.randn(1, 0, 2, 16, device=DEV, requires_grad=True)
    out, lse = triton_attention(q, k, v, causal=False)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(dq, torch.zeros_like(dq))


@pytest.mark.parametrize("dtype", [pytest.param(F64, id="fp64"), pytest.param(F32, id="fp32")])
def test_attention_func_backend_triton(dtype, monkeypatch):
    """The dispatcher's ``backend="triton"`` and the backend override reach it."""
    _check(2, 30, 30, 4, 2, 32, dtype, fn=attention_func, fn_kw={"backend": "triton"}, window=9)
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setattr(attn_mod, "_kernel", None)  # any torch-tile path would now fail
    _check(1, 21, 21, 2, 1, 16, dtype, fn=attention_func)


@pytest.mark.parametrize(
    "D, kw, match",
    [
        pytest.param(24, {}, "head dim", id="D24"),
        pytest.param(16, {"chunk": 4, "window": 3}, "chunk", id="chunk-and-window"),
        pytest.param(16, {"window": 3, "causal": False}, "causal", id="window-non-causal"),
    ],
)
def test_bad_inputs_raise(D, kw, match):
    q, k, v = (torch.randn(1, 8, 2, D) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        triton_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match=match):
        attention_func(q, k, v, backend="triton", **kw)


def test_cpu_without_interpreter_is_refused():
    """Compiled (not interpreted) kernels: CPU tensors are refused with a ValueError up front,
    and the dispatcher does not consider the backend supported. Needs a fresh interpreter
    without TRITON_INTERPRET, hence the subprocess."""
    code = (
        "import torch\n"
        "from megatron_ext.ops.triton import triton_attention, triton_attention_supported\n"
        "q = torch.randn(1, 4, 2, 16)\n"
        "assert not triton_attention_supported(q)\n"
        "try:\n"
        "    triton_attention(q, q, q)\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "refused:" in res.stdout and "interpreter" in res.stdout


# ----------------------------------------------------------------------------- bf16
def _attn_bf16_maths(q, k, v, **kw):
    """The same attention with every matmul and the softmax in the input dtype (bf16)."""
    B, Sq, H, D = q.shape
    rep = H // k.shape[2]
    mask = attention_mask(Sq, k.shape[1], device=q.device, **kw).unsqueeze(1)
    qt = q.transpose(1, 2)
    kt, vt = (x.repeat_interleave(rep, dim=2).transpose(1, 2) for x in (k, v))
    z = (qt @ kt.transpose(-1, -2) * D**-0.5).masked_fill(~mask, float("-inf"))
    return (torch.softmax(z, -1) @ vt).transpose(1, 2), torch.logsumexp(z, -1)


def check_bf16(B, S, H, Hkv, D, device, **kw):
    """docs/methods/checks.md bf16 rule for triton_attention (see the module docstring)."""
    mk = lambda *s: torch.randn(*s, dtype=F64, device=device).bfloat16()  # noqa: E731
    q, k, v, do = mk(B, S, H, D), mk(B, S, Hkv, D), mk(B, S, Hkv, D), mk(B, S, H, D)
    dlse = torch.randn(B, H, S, device=device)
    ref = _fwd_bwd(attention_ref, q.to(F64), k.to(F64), v.to(F64), do.to(F64), dlse, **kw)
    low = _fwd_bwd(_attn_bf16_maths, q, k, v, do, dlse, **kw)
    got = _fwd_bwd(triton_attention, q, k, v, do, dlse, **kw)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == F32
    for name, g, lo, r in zip(("out", "lse"), got, low, ref):
        err, base = (g.double() - r).abs().max().item(), (lo.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-3, f"{name}: {err:.2e} > 2 * {base:.2e} + 1e-3"
    for name, g, r in zip(("dq", "dk", "dv"), got[2:], ref[2:]):
        assert not torch.isnan(g).any(), name
        rel = ((g.double() - r).norm() / r.norm()).item()
        assert rel <= 1e-2, f"{name}: relative error {rel:.2e}"


def test_bf16_rule_tiny():
    check_bf16(1, 40, 2, 1, 32, DEV, window=17)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, S, H, Hkv, D, kw",
    [
        pytest.param(2, 1024, 4, 4, 64, {}, id="D64-S1024-b2"),
        pytest.param(1, 2048, 8, 2, 128, {}, id="D128-S2048-gqa4"),
        pytest.param(1, 3001, 4, 2, 128, {"window": 512}, id="D128-S3001-window"),
        pytest.param(1, 4096, 4, 1, 64, {"doc_ids": _docs(1, 4096, [[0, 1000, 3333]])}, id="docs"),
        pytest.param(1, 2500, 4, 2, 64, {"chunk": 1000}, id="D64-chunk"),
    ],
)
def test_bf16_gpu(B, S, H, Hkv, D, kw):
    if "doc_ids" in kw:
        kw = {"doc_ids": kw["doc_ids"].cuda()}
    check_bf16(B, S, H, Hkv, D, "cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_fp32_gpu_matches_ref(D):
    """fp32 on the GPU uses IEEE dot products (no TF32): 1e-4 over sums of up to 1000 keys."""
    q = torch.randn(1, 777, 4, D, device="cuda")
    k, v = (torch.randn(1, 1000, 2, D, device="cuda") for _ in range(2))
    do, dlse = torch.randn_like(q, dtype=F64), torch.randn(1, 4, 777, dtype=F64, device="cuda")
    got = _fwd_bwd(triton_attention, q, k, v, do, dlse, q_offset=223)
    want = _fwd_bwd(attention_ref, q.double(), k.double(), v.double(), do, dlse, q_offset=223)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        err = (g.double() - w).abs().max().item()
        assert err <= 1e-4, f"{name}: {err:.2e}"
