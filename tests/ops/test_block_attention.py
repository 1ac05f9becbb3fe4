"""``block_attention``: queries against an arbitrary key block, at explicit positions.

Compared: a global packed problem is cut the way context parallelism cuts it (a shuffled subset
of query rows; the keys split into shuffled parts, each with padding tokens mixed in),
``block_attention`` runs on every (queries, key part) pair, the parts are merged with
``merge_attn_outputs``, and out, lse and dq/dk/dv (random dout and dlse) are compared with the
dense ``attention_ref`` on the whole problem. fp64, so the bar of 1e-10 applies (the
two differ only in summation order). Also: padding queries give out 0 / lse -inf with finite
gradients, partials are fp32 for bf16 inputs, and bad arguments raise ValueError.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.ops import attention_ref, block_attention, block_key_ranges, merge_attn_outputs
from megatron_ext.ops.documents import document_runs

F64 = torch.float64


def _problem(B=2, S=29, H=4, Hkv=2, D=8):
    mk = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)  # noqa: E731
    doc_ids = torch.tensor([[0] * 9 + [1] * 12 + [0] * 8, [3] * 29])  # id 0 reappears: 3 docs
    return mk(B, S, H, D), mk(B, S, Hkv, D), mk(B, S, Hkv, D), doc_ids


def _pad_mask(n_real: int, n_pad: int) -> torch.Tensor:
    is_pad = torch.zeros(n_real + n_pad, dtype=torch.bool)
    is_pad[torch.randperm(n_real + n_pad)[:n_pad]] = True
    return is_pad


def _splice(x: torch.Tensor, idx: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
    """x[:, idx] with zero (padding) tokens where is_pad; differentiable w.r.t. x."""
    out = torch.zeros(x.shape[0], is_pad.numel(), *x.shape[2:], dtype=x.dtype)
    slots = torch.arange(is_pad.numel())[~is_pad]
    rows = torch.arange(x.shape[0])[:, None]
    return out.index_put((rows, slots[None, :]), x[:, idx])


def _meta(run: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, is_pad: torch.Tensor):
    """(positions, doc ids) [B, n] of the spliced tokens; padding: position -1, any doc id."""
    p = torch.full((run.shape[0], is_pad.numel()), -1, dtype=torch.int64)
    d = torch.full_like(p, 7)
    p[:, ~is_pad], d[:, ~is_pad] = pos[:, idx], run[:, idx]
    return p, d


MASKS = [
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"causal": False}, id="full"),
    pytest.param({"causal": True, "window": 5}, id="window5"),
    pytest.param({"causal": True, "chunk": 4}, id="chunk4"),
    pytest.param({"causal": True, "window": 3, "chunk": 6}, id="window3+chunk6"),
]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("n_parts", [1, 3], ids=["1part", "3parts"])
def test_split_blocks_merge_to_reference(mask: dict, n_parts: int) -> None:
    q, k, v, doc_ids = _problem()
    S = q.shape[1]
    run, pos = document_runs(doc_ids)
    q_idx = torch.randperm(S)[:19]
    perm = torch.randperm(S)
    cuts = [0, 10, 17, S] if n_parts == 3 else [0, S]
    q_pad = _pad_mask(q_idx.numel(), 3)
    qp, qd = _meta(run, pos, q_idx, q_pad)
    outs, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        idx = perm[a:b]
        k_pad = _pad_mask(idx.numel(), 2)
        kp, kd = _meta(run, pos, idx, k_pad)
        o, lse = block_attention(
            _splice(q, q_idx, q_pad), _splice(k, idx, k_pad), _splice(v, idx, k_pad),
            q_positions=qp, k_positions=kp, q_doc_ids=qd, k_doc_ids=kd, **mask,
        )  # fmt: skip
        outs.append(o)
        lses.append(lse)
    out, lse = merge_attn_outputs(outs, lses)
    assert bool((out[:, q_pad] == 0).all()) and bool(torch.isneginf(lse[:, :, q_pad]).all())
    out, lse = out[:, ~q_pad], lse[:, :, ~q_pad]
    want_out, want_lse = attention_ref(q, k, v, doc_ids=doc_ids, **mask)
    want_out, want_lse = want_out[:, q_idx], want_lse[:, :, q_idx]
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-10)
    g, gl = torch.randn_like(want_out), torch.randn_like(want_lse)
    got = torch.autograd.grad((out * g).sum() + (lse * gl).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * g).sum() + (want_lse * gl).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d{name}")


def test_shared_positions_without_docs_equal_plain_causal() -> None:
    """[S] positions, no doc ids, keys reversed: plain causal attention, any key order."""
    q, k, v, _ = _problem()
    pos = torch.arange(q.shape[1])
    rev = pos.flip(0)
    out, lse = block_attention(q, k[:, rev], v[:, rev], q_positions=pos, k_positions=rev)
    want_out, want_lse = attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-10)


def test_long_window_uses_several_query_blocks() -> None:
    """Sq = 150 > 64 rows per block under a window: the blocks concatenate exactly."""
    B, S, W = 1, 150, 5
    q, k, v = (torch.randn(B, S, 2, 8, dtype=F64, requires_grad=True) for _ in range(3))
    pos, perm = torch.arange(S), torch.randperm(S)
    out, lse = block_attention(
        q, k[:, perm], v[:, perm], q_positions=pos, k_positions=perm, window=W
    )
    want_out, want_lse = attention_ref(q, k, v, window=W)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-10)
    g = torch.randn_like(want_out)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * g).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_padding_only_rows_are_zero_with_finite_grads() -> None:
    q, k, v, _ = _problem(S=6)
    qp = torch.tensor([0, -1, 2, -1, 4, 5])
    kp = torch.tensor([0, 1, -1, 3, -1, -1])
    out, lse = block_attention(q, k, v, q_positions=qp, k_positions=kp, causal=False)
    assert bool((out[:, qp < 0] == 0).all()) and bool(torch.isneginf(lse[:, :, qp < 0]).all())
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    for t in (q, k, v):
        assert bool(torch.isfinite(t.grad).all())
    assert bool((k.grad[:, kp < 0] == 0).all())  # padding keys are never visible
    assert bool((q.grad[:, qp < 0] == 0).all())


def test_bf16_partials_are_fp32() -> None:
    q, k, v, _ = _problem(S=9)
    pos = torch.arange(9)
    out, lse = block_attention(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), q_positions=pos, k_positions=pos
    )
    assert out.dtype == lse.dtype == torch.float32


def test_key_ranges_are_intervals_of_ordered_keys() -> None:
    qp = torch.tensor([[3, 9]])
    kp = torch.tensor([[9, 0, 5, 3, -1]])
    order, lo, hi = block_key_ranges(qp, kp, causal=True, window=4)
    assert order.tolist() == [[1, 3, 2, 0, 4]]  # keys 0, 3, 5, 9, then padding
    assert lo.tolist() == [[0, 3]] and hi.tolist() == [[2, 4]]  # {0, 3} and {9} (5 < j <= 9)


ERRORS = [
    pytest.param({"q_doc_ids": torch.zeros(1, 4, dtype=torch.long)}, "give both", id="one-doc"),
    pytest.param({"causal": False, "window": 2}, "window and chunk masks are causal", id="w-nc"),
    pytest.param({"chunk": 0}, "chunk=0", id="chunk0"),
    pytest.param({"q_positions": torch.zeros(3, dtype=torch.long)}, "q_positions", id="qpos"),
    pytest.param({"k_positions": torch.zeros(4)}, "k_positions", id="float-kpos"),
    pytest.param({"softmax_scale": float("nan")}, "softmax_scale", id="scale"),
]


@pytest.mark.parametrize(("kw", "match"), ERRORS)
def test_bad_arguments_raise(kw: dict, match: str) -> None:
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    args = {"q_positions": torch.arange(4), "k_positions": torch.arange(4), **kw}
    with pytest.raises(ValueError, match=match):
        block_attention(q, k, v, **args)


def test_gqa_head_mismatch_raises() -> None:
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="H % Hkv"):
        block_attention(q, k, k, q_positions=torch.arange(4), k_positions=torch.arange(4))
