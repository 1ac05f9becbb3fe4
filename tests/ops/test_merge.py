"""Exact merge of partial attention results (check A2 of docs/methods/checks.md).

Compared: ``merge_attn_outputs`` over parts computed on disjoint key sets (random partitions,
one part empty) against one softmax over the union, in out, lse and dq/dk/dv obtained by
autograd with a random dout and a random dlse. fp64, so 1e-10 is the bar (observed
~1e-15). A merge with detached weights, written here, must FAIL the gradient comparison by more
than 1e-2 (it drops the D-term correction); bf16 parts must be accumulated in fp32 (bit-equal to
merging the upcast parts); rows where every part is empty must give out 0, lse -inf and finite
gradients.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.ops import attention_func, attention_ref, merge_attn_outputs

F64 = torch.float64


def _inputs(B=2, Sq=11, Sk=23, H=4, Hkv=2, D=16):
    mk = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)  # noqa: E731
    return mk(B, Sq, H, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D)


def _grads(out, lse, g, gl, params):
    return torch.autograd.grad((out * g).sum() + (lse * gl).sum(), params, retain_graph=True)


def _detached_merge(outs, lses):
    """The released ChunkLlama merge: weights treated as constants (wrong gradient)."""
    lse = torch.logsumexp(torch.stack(lses), 0)
    out = sum(
        torch.exp(lk - lse).detach().transpose(1, 2)[..., None] * o for o, lk in zip(outs, lses)
    )
    return out, lse


def _random_parts(Sk: int, n: int) -> list[torch.Tensor]:
    perm = torch.randperm(Sk)
    cuts = sorted(torch.randint(1, Sk, (n - 2,)).tolist())
    parts = [perm[a:b] for a, b in zip([0, *cuts], [*cuts, Sk])]
    return [*parts, perm[:0]]  # plus an empty part


@pytest.mark.parametrize("n_parts", [2, 4], ids=["2+empty", "4+empty"])
def test_a2_random_partition_equals_union(n_parts: int) -> None:
    q, k, v = _inputs()
    g, gl = torch.randn(2, 11, 4, 16, dtype=F64), torch.randn(2, 4, 11, dtype=F64)
    parts = _random_parts(k.shape[1], n_parts + 1)
    pieces = [attention_ref(q, k[:, idx], v[:, idx], causal=False) for idx in parts]
    assert bool(torch.isneginf(pieces[-1][1]).all())  # the empty part
    out, lse = merge_attn_outputs([p[0] for p in pieces], [p[1] for p in pieces])
    want_out, want_lse = attention_ref(q, k, v, causal=False)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-10)
    got = _grads(out, lse, g, gl, (q, k, v))
    want = _grads(want_out, want_lse, g, gl, (q, k, v))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # Negative control: detached weights give a visibly wrong gradient.
    bad_out, bad_lse = _detached_merge([p[0] for p in pieces], [p[1] for p in pieces])
    torch.testing.assert_close(bad_out, want_out, rtol=0, atol=1e-10)  # forward is still right
    bad = _grads(bad_out, bad_lse, g, gl, (q, k, v))
    assert max((a - b).abs().max().item() for a, b in zip(bad, want)) > 1e-2


@pytest.mark.parametrize("backend", ["cpu_fused", "torch_blockwise"])
def test_a2_causal_prefix_split_with_attention_func(backend: str) -> None:
    """Decode-style causal split: keys [0, off) full + [off, Sk) causal, via attention_func."""
    q, k, v = _inputs(Sq=9, Sk=30)
    off = 21
    g, gl = torch.randn(2, 9, 4, 16, dtype=F64), torch.randn(2, 4, 9, dtype=F64)
    p1 = attention_func(q, k[:, :off], v[:, :off], causal=False, backend=backend)
    p2 = attention_func(q, k[:, off:], v[:, off:], causal=True, backend=backend)
    out, lse = merge_attn_outputs([p1[0], p2[0]], [p1[1], p2[1]])
    want_out, want_lse = attention_ref(q, k, v, q_offset=off)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-10)
    for a, b in zip(
        _grads(out, lse, g, gl, (q, k, v)), _grads(want_out, want_lse, g, gl, (q, k, v))
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_all_parts_empty_rows_are_safe() -> None:
    outs = [torch.randn(1, 5, 2, 4, dtype=F64, requires_grad=True) for _ in range(3)]
    lses = [torch.randn(1, 2, 5, dtype=F64) for _ in range(3)]
    for lk in lses:
        lk[:, :, 1] = float("-inf")  # row 1: no key in any part
    lses[0][:, :, 3] = float("-inf")  # row 3: one part empty
    outs_in = [o.detach().clone() for o in outs]
    for o in outs_in:
        o[:, 1] = 0.0
    outs_in = [o.requires_grad_() for o in outs_in]
    lses = [lk.requires_grad_() for lk in lses]
    out, lse = merge_attn_outputs(outs_in, lses)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert bool(torch.isneginf(lse[:, :, 1]).all()) and bool(torch.isfinite(lse[:, :, 3]).all())
    gl = torch.randn(1, 2, 5, dtype=F64)
    loss = out.sum() + torch.where(torch.isfinite(lse), lse, 0).mul(gl).sum()
    grads = torch.autograd.grad(loss, [*outs_in, *lses])
    assert all(torch.isfinite(x).all() for x in grads)
    assert torch.equal(grads[3][:, :, 3], torch.zeros_like(grads[3][:, :, 3]))  # empty part: 0


def test_bf16_parts_accumulate_in_fp32() -> None:
    outs = [torch.randn(2, 7, 4, 8).bfloat16() for _ in range(3)]
    lses = [torch.randn(2, 4, 7) * 3 for _ in range(3)]
    out, lse = merge_attn_outputs(outs, lses)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    want, want_lse = merge_attn_outputs([o.float() for o in outs], lses)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    # A merge that rounds the weighted sum to bf16 is measurably worse.
    assert (want.bfloat16().float() - want).abs().max() > 1e-4


@pytest.mark.parametrize(
    "outs, lses, match",
    [
        pytest.param([], [], "len", id="empty"),
        pytest.param([torch.zeros(1, 3, 2, 4)], [], "len", id="count"),
        pytest.param([torch.zeros(1, 3, 2, 4)], [torch.zeros(1, 3, 2)], "lses", id="lse-shape"),
        pytest.param(
            [torch.zeros(1, 3, 2, 4), torch.zeros(1, 4, 2, 4)],
            [torch.zeros(1, 2, 3)] * 2,
            r"outs\[1\]",
            id="out-shape",
        ),  # fmt: skip
    ],
)
def test_bad_inputs_raise(outs, lses, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        merge_attn_outputs(outs, lses)
