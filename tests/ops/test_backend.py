"""The backend choice: a pure function of (device, dtype, head dim, mask kind, installed).

Every (device, dtype, mask) combination is checked against the rule written out in
``ops/backend.py``'s table, with and without flash-attn / Triton installed, so a GPU machine's
dispatch is verified on a CPU. Also: the override (environment variable and context manager,
the context manager winning), refusal of unknown names, and that a forced backend reaches the
op (the fused CPU kernel is never called under ``torch_blockwise``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_ext.ops import attention_func, backend
from megatron_ext.ops.backend import (
    BACKENDS,
    ENV_VAR,
    MASKS,
    Installed,
    choose_backend,
    choose_prologue,
    force_backend,
    forced_backend,
)

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
NOTHING = Installed()
CPU_FUSED = Installed(fused_cpu=True)
GPU_ALL = Installed(fused_cpu=True, triton=True, flash_attn=True)
GPU_TRITON = Installed(fused_cpu=True, triton=True)
INTERPRETED = Installed(fused_cpu=True, triton=True, triton_interpreted=True)


def _expected(device: str, dtype: torch.dtype, d: int, mask: str, have: Installed,
              need_lse: bool = True, seq_len: int = 0) -> str:
    """The rule, written independently of the implementation's control flow."""
    half = dtype in (BF16, F16)
    if device == "cuda" and not need_lse and mask in ("causal", "full"):
        return "sdpa"
    if device == "cuda" and half and mask == "intervals" and d in (64, 128):
        return "sdpa"
    triton_ok = (
        have.triton
        and d in (16, 32, 64, 128, 256)
        and (device == "cuda" or (device == "cpu" and have.triton_interpreted))
    )
    if mask == "dca":
        if device == "cuda" and half and d in (64, 128) and seq_len >= 65536:
            return "sdpa"
        return "triton" if device == "cuda" and half and triton_ok else "torch_blockwise"
    if device == "cpu":
        if have.fused_cpu:
            return "cpu_fused" if mask in ("causal", "full") else "cpu_blockwise"
        return "torch_blockwise"
    if device == "cuda" and half and have.flash_attn and mask in ("causal", "full", "window"):
        return "flash_attn"
    if device == "cuda" and half and triton_ok:
        return "triton"
    return "torch_blockwise"


@pytest.mark.parametrize("have", [NOTHING, CPU_FUSED, GPU_ALL, GPU_TRITON, INTERPRETED],
                         ids=["nothing", "cpu-fused", "gpu-all", "gpu-triton", "interpreted"])
def test_choice_on_every_case(have: Installed) -> None:
    for device, dtype, d, mask, need_lse, seq in itertools.product(
        ("cpu", "cuda", "mps"), (BF16, F16, F32, F64), (64, 80, 128), MASKS, (True, False),
        (1, 4096, 16384, 65536, 131072),
    ):
        got = choose_backend(device, dtype, d, mask, have, need_lse=need_lse, seq_len=seq)
        assert got in BACKENDS
        want = _expected(device, dtype, d, mask, have, need_lse, seq)
        assert got == want, (device, dtype, d, mask, need_lse)


def test_known_cases() -> None:
    """A few cases spelled out, as a reader of the table would expect them."""
    assert choose_backend("cpu", F32, 64, "causal", CPU_FUSED) == "cpu_fused"
    assert choose_backend("cpu", F32, 64, "intervals", CPU_FUSED) == "cpu_blockwise"
    assert choose_backend("cuda", BF16, 128, "causal", GPU_ALL) == "flash_attn"
    assert choose_backend("cuda", BF16, 128, "documents", GPU_ALL) == "triton"
    assert choose_backend("cuda", BF16, 128, "dca", GPU_ALL) == "triton"
    assert choose_backend("cuda", BF16, 128, "dca", GPU_ALL, seq_len=4096) == "triton"
    assert choose_backend("cuda", BF16, 128, "dca", GPU_ALL, seq_len=16384) == "triton"
    assert choose_backend("cuda", BF16, 128, "dca", GPU_ALL, seq_len=65536) == "sdpa"
    assert choose_backend("cpu", BF16, 128, "dca", GPU_ALL, seq_len=65536) == "torch_blockwise"
    assert choose_backend("cuda", BF16, 80, "dca", GPU_ALL) == "torch_blockwise"
    assert choose_backend("cuda", F32, 128, "causal", GPU_ALL) == "torch_blockwise"
    assert choose_backend("cuda", BF16, 128, "intervals", GPU_ALL) == "sdpa"
    assert choose_backend("cuda", BF16, 256, "intervals", GPU_ALL) == "triton"
    assert choose_backend("cuda", F32, 128, "intervals", GPU_ALL) == "torch_blockwise"
    assert choose_backend("cuda", BF16, 128, "causal", GPU_ALL, need_lse=False) == "sdpa"
    assert choose_backend("cuda", BF16, 128, "documents", GPU_ALL, need_lse=False) == "triton"
    assert choose_backend("cpu", F32, 64, "causal", CPU_FUSED, need_lse=False) == "cpu_fused"
    assert choose_prologue("cuda", BF16, GPU_ALL) == "triton"
    assert choose_prologue("cuda", F64, GPU_ALL) == "torch"
    assert choose_prologue("cpu", F32, INTERPRETED) == "torch"


def test_bad_mask_is_refused() -> None:
    with pytest.raises(ValueError, match=r"mask='sparse'; expected one of"):
        choose_backend("cpu", F32, 64, "sparse", CPU_FUSED)


def test_override_env_and_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert forced_backend() is None
    monkeypatch.setenv(ENV_VAR, "torch_blockwise")
    assert forced_backend() == "torch_blockwise"
    with force_backend("cpu_blockwise"):
        assert forced_backend() == "cpu_blockwise"  # the context manager wins
        with force_backend(None):
            assert forced_backend() == "torch_blockwise"  # None: back to the environment
    assert forced_backend() == "torch_blockwise"
    monkeypatch.setenv(ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=rf"{ENV_VAR} / force_backend = 'cudnn'"):
        forced_backend()
    with pytest.raises(ValueError, match=r"force_backend\('cudnn'\)"), force_backend("cudnn"):
        pass


def test_forced_backend_reaches_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch_blockwise the fused CPU kernel is never built; results agree."""
    q, k, v = (torch.randn(2, 19, 4, 16, dtype=F64) for _ in range(3))
    want, _ = attention_func(q, k, v, window=5)
    import megatron_ext.ops.attention as attn_mod

    def no_fused(*a, **kw):
        raise AssertionError("fused CPU kernel used under a forced torch_blockwise")

    monkeypatch.setattr(attn_mod, "FusedCPUTiles", no_fused)
    with force_backend("torch_blockwise"):
        got, _ = attention_func(q, k, v, window=5)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    with force_backend("cpu_blockwise"), pytest.raises(AssertionError, match="fused CPU"):
        attention_func(q, k, v, window=5)


def test_choice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    backend._logged.clear()
    q = torch.zeros(1, 3, 2, 8)
    with caplog.at_level("INFO", logger="megatron_ext"):
        for _ in range(3):
            backend.resolve_backend(q, "causal")
    lines = [r.message for r in caplog.records if "attention backend" in r.message]
    assert lines == ["attention backend: cpu_fused (auto) for cpu float32 head_dim=8 mask=causal"]


def test_sdpa_backend_matches_reference() -> None:
    """The SDPA path (its CPU twin here): out and gradients of plain causal / full attention
    with GQA equal the reference; asked for an lse or a mask it cannot take, it refuses."""
    from megatron_ext.ops import attention_ref

    q = torch.randn(2, 19, 4, 16, dtype=F64, requires_grad=True)
    k, v = (torch.randn(2, 19, 2, 16, dtype=F64, requires_grad=True) for _ in range(2))
    for causal in (True, False):
        out, lse = attention_func(q, k, v, causal=causal, backend="sdpa", need_lse=False)
        want, _ = attention_ref(q, k, v, causal=causal)
        assert lse is None
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
        g = torch.autograd.grad(out.sum(), (q, k, v))
        gw = torch.autograd.grad(want.sum(), (q, k, v))
        for a, b in zip(g, gw):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="returns no lse"):
        attention_func(q, k, v, backend="sdpa")
    with pytest.raises(ValueError, match="plain mask=False"):
        attention_func(q, k, v, backend="sdpa", need_lse=False, window=3)
    with pytest.raises(ValueError, match="top-left=False"):
        attention_func(q[:, :5], k, v, q_offset=14, backend="sdpa", need_lse=False)
