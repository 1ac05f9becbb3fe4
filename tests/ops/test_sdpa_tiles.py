"""The SDPA tile kernel (``ops/sdpa_tiles.py``) on its CPU engine: the twin of its CUDA engines.

The kernel's own logic (whole row blocks per piece, ragged edges on torch tiles, GQA by
repeating KV heads and folding their gradients, the extra columns that carry a gradient into
lse) is engine-independent; here it runs on torch's fused CPU ops and must give what the plain
torch tiles give for interval attention, the CP block function and whole DCA (forward and
backward, also with a gradient flowing into lse). fp32: 2e-5 (another summation order).
The CUDA engines (cuDNN, flash) are checked against the fp32 reference in
``benchmarks/bench_gpu.py`` on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.ops import block_attention, dual_chunk_attn_func, force_backend
from megatron_ext.ops.intervals import interval_attention
from megatron_ext.ops.sdpa_tiles import SDPATiles, force_engine, sdpa_engine

TOL = 2e-5


def _run(backend: str, fn, q, k, v, with_lse: bool = True):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    with force_backend(backend):
        res = fn(q, k, v)
    out, lse = res if isinstance(res, tuple) else (res, None)
    g = torch.Generator().manual_seed(3)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    got = [out]
    if with_lse and lse is not None:
        live = torch.isfinite(lse)
        loss = loss + (torch.where(live, lse, 0) * torch.randn(lse.shape, generator=g)).sum()
        got.append(torch.where(live, lse, 0))
    loss.backward()
    return got + [q.grad, k.grad, v.grad]


def _compare(fn, q, k, v, with_lse: bool = True) -> None:
    want = _run("torch_blockwise", fn, q, k, v, with_lse)
    calls = []
    fused_fwd = SDPATiles.fwd

    def spy(self, *args):
        calls.append(args[3].kind)
        return fused_fwd(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SDPATiles, "fwd", spy)
        got = _run("sdpa", fn, q, k, v, with_lse)
    assert calls, "the sdpa backend never reached SDPATiles"
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= TOL, f"output {i}: {err:.2e} > {TOL}"


@pytest.mark.parametrize("sq, sk, h, hkv, d", [(37, 45, 4, 2, 16), (5, 7, 2, 2, 64),
                                               (33, 33, 4, 1, 128)], ids=["gqa", "short", "d128"])
def test_intervals_match_torch_tiles(sq, sk, h, hkv, d) -> None:
    q = torch.randn(2, sq, h, d)
    k, v = (torch.randn(2, sk, hkv, d) for _ in range(2))
    r = torch.arange(sq)
    lo = (r - 9).clamp(min=0).repeat(2, 1)
    hi = (r + 5).clamp(max=sk).repeat(2, 1)
    lo[:, :3] = hi[:, :3] = 0  # rows without keys
    lo[1, sq // 2 :] = torch.maximum(lo[1, sq // 2 :], torch.tensor(sq // 2))
    _compare(lambda q, k, v: interval_attention(q, k, v, lo, hi, softmax_scale=d**-0.5), q, k, v)


def test_block_attention_matches_torch_tiles() -> None:
    q = torch.randn(2, 24, 4, 64)
    k, v = (torch.randn(2, 24, 2, 64) for _ in range(2))
    pos = torch.arange(24).repeat(2, 1)
    kw = {"q_positions": pos + 24, "k_positions": pos}
    _compare(lambda q, k, v: block_attention(q, k, v, **kw), q, k, v)


@pytest.mark.parametrize("S, H, Hkv, D", [(1, 2, 2, 64), (67, 4, 2, 64), (50, 2, 1, 128)])
def test_dca_matches_torch_tiles(S, H, Hkv, D) -> None:
    q = torch.randn(2, S, H, D)
    k, v = (torch.randn(2, S, Hkv, D) for _ in range(2))
    _compare(lambda q, k, v: dual_chunk_attn_func(q, k, v, chunk_size=16, local_size=4),
             q, k, v, with_lse=False)


def test_engine_choice_and_bad_engine(monkeypatch) -> None:
    assert sdpa_engine(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("MEGATRON_EXT_SDPA_ENGINE", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        sdpa_engine(torch.device("cuda"))
    x = torch.zeros(1, 1, 2, 8)
    with pytest.raises(ValueError, match="engine='nope'"):
        SDPATiles(x, x, x, 1.0, engine="nope")


def test_force_engine_wins_over_the_environment(monkeypatch) -> None:
    cuda = torch.device("cuda")  # the engine choice reads only the device type
    monkeypatch.setenv("MEGATRON_EXT_SDPA_ENGINE", "flash")
    assert sdpa_engine(cuda) == "flash"
    with force_engine("cudnn"):
        assert sdpa_engine(cuda) == "cudnn"
        assert sdpa_engine(torch.device("cpu")) == "cpu"
    assert sdpa_engine(cuda) == "flash"
    with pytest.raises(ValueError, match="force_engine\\('nope'\\)"), force_engine("nope"):
        pass
