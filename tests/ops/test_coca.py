"""CoCA op: fast path (prologue + attention_func) vs dense reference vs test-local oracles.

What is compared with what (ops/coca/README.md; checks C1-C4 of docs/methods/checks.md):
- the dense reference ``coca_attn_ref`` against oracles written here from the formulas (an
  independent fp64 rotate-half and a direct ``cos((m - n) w)`` for Eq. 9);
- C1/C2: ``coca_attn_func`` (slack and strict) against ``coca_attn_ref`` in out, lse and the
  gradients of q, t and v (a random upstream for out *and* lse), on awkward shapes;
- C2/C3: strict logits are unchanged when every position moves by a constant; slack equals
  strict when ``q[i] == q[i + D/2]``, and slack does change under a shift (negative test);
- C4: the closed-form prologue backward against autograd through a plain-torch prologue,
  including tau exactly 0 and negative pre-activations, plus a finite-difference gradcheck; the
  prologue saves only its input and the cos/sin tables for backward;
- the fused Triton prologue kernels (run by the Triton interpreter on CPU) against the torch
  prologue, forward and backward, and inside ``coca_attn_func``.

Tolerances: fp64 1e-10 and fp32 1e-5 (docs/methods/checks.md). Every path is a handful of exact
reassociations of the same sums, so fp64 agreement is ~1e-15; 1e-10 leaves room for the
reductions' order. fp32 inputs of unit scale give logits O(10) and errors ~1e-6. bf16 follows
the §7 rule: the fast path's error against fp64 at most twice that of the reference run on bf16
inputs, plus 1e-3 (Q' and K' are rounded to bf16 once more before the attention kernel).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.ops.attention_ref import attention_ref
from megatron_ext.ops.backend import ENV_VAR
from megatron_ext.ops.coca import (
    coca_attn_func,
    coca_attn_ref,
    coca_key_prologue,
    coca_query_prologue,
    coca_tau,
)
from megatron_ext.ops.rope import RopeScaling, apply_rope

F64 = torch.float64


# ----------------------------------------------------------------------------- oracles


def _rotate(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Independent fp64 rotate-half RoPE; x [B, S, H, D], pos [S] or [B, S]."""
    D = x.shape[-1]
    w = theta ** (-2.0 * torch.arange(D // 2, dtype=F64) / D)
    ang = (pos.to(F64)[..., None] * w).unsqueeze(-2)
    c, s = ang.cos(), ang.sin()
    x1, x2 = x.split(D // 2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _oracle_logits(q, t, pos_q, pos_k, form, theta=10000.0):
    """Dense CoCA logits [B, H, Sq, Sk] straight from ops/coca/README.md (fp64, default RoPE)."""
    D, n_rep = q.shape[-1], q.shape[2] // t.shape[2]
    tau = torch.relu((t[..., : D // 2] + t[..., D // 2 :]) / 2).repeat_interleave(n_rep, dim=2)
    if form == "slack":
        t_rot = _rotate(torch.cat((tau, tau), dim=-1), pos_k, theta)
        z = torch.einsum("bmhd,bnhd,bmhd->bhmn", q, t_rot, _rotate(q, pos_q, theta))
    else:
        w = theta ** (-2.0 * torch.arange(D // 2, dtype=F64) / D)
        cos_diff = torch.cos((pos_q[:, None] - pos_k[None, :]).to(F64)[..., None] * w)
        energy = q[..., : D // 2] ** 2 + q[..., D // 2 :] ** 2
        z = torch.einsum("bmhi,bnhi,mni->bhmn", energy, tau, cos_diff)
    return z / math.sqrt(D)


def _softmax_out(z, v, mask):
    """(out [B, Sq, H, D], lse [B, H, Sq]) for logits z [B, H, Sq, Sk] and a bool mask."""
    z = z.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    v = v.repeat_interleave(z.shape[1] // v.shape[2], dim=2)
    return torch.einsum("bhmn,bnhd->bmhd", torch.exp(z - lse[..., None]), v), lse


def _causal(Sq, Sk, q_offset):
    return torch.arange(Sk)[None, :] <= torch.arange(q_offset, q_offset + Sq)[:, None]


def _plain_prologues(q, t, pos_q, pos_k, form, scaling=None):
    """Q', K' (or Q'', K'') by autograd through plain torch ops: the C4 oracle."""
    D = q.shape[-1]
    tau = coca_tau(t)
    kw = {"scaling": scaling}
    if form == "slack":
        return q * apply_rope(q, pos_q, **kw), apply_rope(torch.cat((tau, tau), -1), pos_k, **kw)
    energy = q[..., : D // 2] ** 2 + q[..., D // 2 :] ** 2
    zq, zk = torch.zeros_like(energy), torch.zeros_like(tau)
    return (
        apply_rope(torch.cat((energy, zq), -1), pos_q, **kw),
        apply_rope(torch.cat((tau, zk), -1), pos_k, **kw),
    )


# ----------------------------------------------------------------------------- helpers


def _inputs(B, Sq, Sk, H, Hkv, D, dtype=F64):
    q = torch.randn(B, Sq, H, D, dtype=dtype, requires_grad=True)
    t = torch.randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=True)
    return q, t, v


def _run(fn, q, t, v, do, dlse, **kw):
    """out, lse and the grads of q, t, v for loss <out, do> + <lse, dlse>."""
    out, lse = fn(q, t, v, return_lse=True, **kw)
    loss = (out.to(F64) * do).sum() + (lse.to(F64) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, t, v))
    return (out.detach(), lse.detach(), *grads)


def _assert_close(got, want, atol, names=("out", "lse", "dq", "dt", "dv")):
    for name, a, b in zip(names, got, want):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err = (a.to(F64) - b.to(F64)).abs().max().item()
        assert err <= atol, f"{name}: max abs error {err:.3e} > {atol:.0e}"


def _docs(B, S):
    """Packed rows: two or three documents with boundaries at odd places."""
    doc = torch.zeros(B, S, dtype=torch.long)
    doc[:, S // 3 :] = 1
    doc[-1, (2 * S) // 3 :] = 2
    return doc


# (B, Sq, Sk, H, Hkv, D, q_offset, causal, docs)
CASES = [
    pytest.param(1, 1, 1, 2, 2, 64, 0, True, False, id="S1"),
    pytest.param(2, 7, 7, 4, 2, 64, 0, True, False, id="odd-S-gqa-b2"),
    pytest.param(1, 5, 5, 2, 1, 128, 0, True, False, id="D128-mqa"),
    pytest.param(2, 3, 9, 4, 2, 64, 6, True, False, id="q_offset-bottom-right"),
    pytest.param(1, 4, 9, 2, 2, 64, 2, True, False, id="q_offset-chunked-prefill"),
    pytest.param(2, 5, 6, 4, 2, 64, 0, False, False, id="non-causal-Sq<Sk"),
    pytest.param(2, 11, 11, 4, 2, 64, 0, True, True, id="doc_ids"),
    pytest.param(2, 4, 11, 2, 1, 64, 7, True, True, id="doc_ids-q_offset"),
]


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("form", ["slack", "strict"])
@pytest.mark.parametrize("B, Sq, Sk, H, Hkv, D, q_offset, causal, docs", CASES[:6])
def test_ref_matches_oracle(form, B, Sq, Sk, H, Hkv, D, q_offset, causal, docs):
    q, t, v = _inputs(B, Sq, Sk, H, Hkv, D)
    pos_q, pos_k = torch.arange(q_offset, q_offset + Sq), torch.arange(Sk)
    z = _oracle_logits(q, t, pos_q, pos_k, form)
    mask = _causal(Sq, Sk, q_offset) if causal else torch.ones(Sq, Sk, dtype=torch.bool)
    want = _softmax_out(z, v, mask)
    got = coca_attn_ref(q, t, v, form=form, causal=causal, q_offset=q_offset, return_lse=True)
    _assert_close(got, want, 1e-10, names=("out", "lse"))


def test_ref_doc_positions_restart():
    """A packed row equals its documents run one by one (positions restart at 0)."""
    q, t, v = _inputs(1, 10, 10, 2, 1, 64)
    doc = torch.tensor([[0] * 4 + [1] * 6])
    out, lse = coca_attn_ref(q, t, v, doc_ids=doc, return_lse=True)
    for lo, hi in ((0, 4), (4, 10)):
        o, lse_d = coca_attn_ref(q[:, lo:hi], t[:, lo:hi], v[:, lo:hi], return_lse=True)
        _assert_close((out[:, lo:hi], lse[..., lo:hi]), (o, lse_d), 1e-12, names=("out", "lse"))


# ----------------------------------------------------------------------------- C1 / C2 fast path


@pytest.mark.parametrize("form", ["slack", "strict"])
@pytest.mark.parametrize("B, Sq, Sk, H, Hkv, D, q_offset, causal, docs", CASES)
def test_fwd_bwd_matches_ref_fp64(form, B, Sq, Sk, H, Hkv, D, q_offset, causal, docs):
    q, t, v = _inputs(B, Sq, Sk, H, Hkv, D)
    do, dlse = torch.randn(B, Sq, H, D, dtype=F64), torch.randn(B, H, Sq, dtype=F64)
    kw = dict(form=form, causal=causal, q_offset=q_offset, doc_ids=_docs(B, Sk) if docs else None)
    want = _run(coca_attn_ref, q, t, v, do, dlse, **kw)
    got = _run(coca_attn_func, q, t, v, do, dlse, **kw)
    _assert_close(got, want, 1e-10)
    assert got[3].abs().max() > 0, "dt is identically zero: tau never active"


@pytest.mark.parametrize(
    "form, scaling",
    [
        pytest.param("slack", RopeScaling("linear", 4.0), id="slack-linear"),
        pytest.param(
            "slack", RopeScaling("dynamic", 4.0, original_max_position_embeddings=4), id="slack-ntk"
        ),
        pytest.param(
            "strict", RopeScaling("yarn", 8.0, original_max_position_embeddings=4), id="strict-yarn"
        ),
    ],
)
def test_fwd_bwd_matches_ref_scaled_rope(form, scaling):
    q, t, v = _inputs(2, 9, 9, 4, 2, 64)
    do, dlse = torch.randn(2, 9, 4, 64, dtype=F64), torch.randn(2, 4, 9, dtype=F64)
    kw = dict(form=form, rope_scaling=scaling, theta=500.0)
    want = _run(coca_attn_ref, q, t, v, do, dlse, **kw)
    got = _run(coca_attn_func, q, t, v, do, dlse, **kw)
    _assert_close(got, want, 1e-10)
    plain = coca_attn_ref(q, t, v, form=form, theta=500.0)
    assert (plain - want[0]).abs().max() > 1e-3, "scaling had no effect"


@pytest.mark.parametrize("form", ["slack", "strict"])
@pytest.mark.parametrize("B, Sq, Sk, H, Hkv, D, q_offset, causal, docs", [CASES[1], CASES[7]])
def test_fwd_bwd_matches_ref_fp32(form, B, Sq, Sk, H, Hkv, D, q_offset, causal, docs):
    q, t, v = _inputs(B, Sq, Sk, H, Hkv, D, dtype=torch.float32)
    do, dlse = torch.randn(B, Sq, H, D, dtype=F64), torch.randn(B, H, Sq, dtype=F64)
    kw = dict(form=form, causal=causal, q_offset=q_offset, doc_ids=_docs(B, Sk) if docs else None)
    q64, t64, v64 = (x.detach().to(F64).requires_grad_() for x in (q, t, v))
    want = _run(coca_attn_ref, q64, t64, v64, do, dlse, **kw)  # exact maths on the same values
    got = _run(coca_attn_func, q, t, v, do, dlse, **kw)
    assert got[1].dtype == torch.float32 and got[0].dtype == torch.float32
    _assert_close(got, want, 1e-5)


def test_bf16_error_within_twice_reference_error():
    q, t, v = _inputs(2, 9, 9, 4, 2, 64)
    q64, t64, v64 = (x.detach() for x in (q, t, v))
    ref = coca_attn_ref(q64, t64, v64)
    low = coca_attn_ref(*(x.bfloat16() for x in (q64, t64, v64)))
    fast = coca_attn_func(*(x.bfloat16() for x in (q64, t64, v64)))
    assert fast.dtype == torch.bfloat16
    err_fast = (fast.to(F64) - ref).abs().max().item()
    err_low = (low.to(F64) - ref).abs().max().item()
    assert err_fast <= 2 * err_low + 1e-3, f"bf16 fast err {err_fast:.3e}, ref err {err_low:.3e}"


# ----------------------------------------------------------------------------- C2 / C3


def _prologue_attention(q, t, v, pos_q, pos_k, form):
    """CoCA at explicit positions: prologues + the dense attention reference."""
    qp = coca_query_prologue(q, pos_q, form=form)
    kp = coca_key_prologue(t, pos_k, form=form)
    return attention_ref(qp, kp, v, causal=True, q_offset=int(pos_q[0] - pos_k[0]))


@pytest.mark.parametrize("shift", [pytest.param(37, id="shift37"), pytest.param(1000, id="1000")])
def test_strict_is_translation_invariant(shift):
    q, t, v = _inputs(2, 6, 8, 4, 2, 64)
    pos_q, pos_k = torch.arange(2, 8), torch.arange(8)
    base = _prologue_attention(q, t, v, pos_q, pos_k, "strict")
    moved = _prologue_attention(q, t, v, pos_q + shift, pos_k + shift, "strict")
    _assert_close(moved, base, 1e-10, names=("out", "lse"))
    # and both equal the Eq. 9 sum at the unshifted positions
    want = _softmax_out(_oracle_logits(q, t, pos_q, pos_k, "strict"), v, _causal(6, 8, 2))
    _assert_close(moved, want, 1e-10, names=("out", "lse"))


def test_slack_changes_under_shift():
    q, t, v = _inputs(1, 8, 8, 2, 2, 64)
    pos = torch.arange(8)
    z0 = _oracle_logits(q, t, pos, pos, "slack")
    z1 = _oracle_logits(q, t, pos + 37, pos + 37, "slack")
    assert (z1 - z0).abs().max() > 1e-3
    base = _prologue_attention(q, t, v, pos, pos, "slack")
    moved = _prologue_attention(q, t, v, pos + 37, pos + 37, "slack")
    assert (moved[0] - base[0]).abs().max() > 1e-3, "slack output did not move with the shift"


def test_slack_equals_strict_for_symmetric_queries():
    q, t, v = _inputs(2, 7, 7, 4, 2, 64)
    q = q.detach()[..., :32].repeat(1, 1, 1, 2).requires_grad_()  # q[i] == q[i + D/2]
    slack = coca_attn_ref(q, t, v, form="slack", return_lse=True)
    strict = coca_attn_ref(q, t, v, form="strict", return_lse=True)
    _assert_close(slack, strict, 1e-10, names=("out", "lse"))
    fast = coca_attn_func(q, t, v, form="slack", return_lse=True)
    _assert_close(fast, strict, 1e-10, names=("out", "lse"))
    general = _inputs(2, 7, 7, 4, 2, 64)[0]  # without the symmetry the forms differ
    gap = coca_attn_ref(general, t, v, form="slack") - coca_attn_ref(general, t, v, form="strict")
    assert gap.abs().max() > 1e-3


# ----------------------------------------------------------------------------- C4 prologue


def _boundary_t(B, S, Hkv, D):
    """t whose pre-activations (t1 + t2)/2 are exactly 0 in some planes, negative in others."""
    t = torch.randn(B, S, Hkv, D, dtype=F64)
    half = D // 2
    t[..., half : half + half // 4] = -t[..., : half // 4]  # pre == 0 exactly: tau = 0
    return t.requires_grad_()


@pytest.mark.parametrize("form", ["slack", "strict"])
@pytest.mark.parametrize(
    "scaling, pos2d",
    [
        pytest.param(None, False, id="default"),
        pytest.param(None, True, id="per-row-positions"),
        pytest.param(
            RopeScaling("yarn", 4.0, original_max_position_embeddings=8), False, id="yarn"
        ),
    ],
)
def test_prologue_backward_matches_autograd(form, scaling, pos2d):
    B, S, H, Hkv, D = 2, 5, 4, 2, 64
    q = torch.randn(B, S, H, D, dtype=F64, requires_grad=True)
    t = _boundary_t(B, S, Hkv, D)
    pre = (t[..., : D // 2] + t[..., D // 2 :]) / 2
    assert (pre == 0).any() and (pre < 0).any() and (pre > 0).any()
    pos = torch.tensor([[3, 0, 7, 1, 12], [0, 1, 2, 3, 4]]) if pos2d else torch.arange(5) + 9
    gq, gk = torch.randn(B, S, H, D, dtype=F64), torch.randn(B, S, Hkv, D, dtype=F64)

    want_q, want_k = _plain_prologues(q, t, pos, pos, form, scaling)
    want = (want_q, want_k, *torch.autograd.grad((want_q * gq).sum() + (want_k * gk).sum(), (q, t)))
    got_q = coca_query_prologue(q, pos, form=form, scaling=scaling)
    got_k = coca_key_prologue(t, pos, form=form, scaling=scaling)
    got = (got_q, got_k, *torch.autograd.grad((got_q * gq).sum() + (got_k * gk).sum(), (q, t)))
    _assert_close(got, want, 1e-10, names=("Q'", "K'", "dq", "dt"))
    dt = got[3]
    assert (dt[..., : D // 2] == dt[..., D // 2 :]).all()
    assert (dt[..., : D // 2][pre <= 0] == 0).all(), "gradient leaked through an inactive tau"


@pytest.mark.parametrize("form", ["slack", "strict"])
def test_prologue_gradcheck(form):
    q = torch.randn(1, 3, 2, 8, dtype=F64, requires_grad=True)
    t = torch.randn(1, 3, 1, 8, dtype=F64)
    t[..., 4:] = t[..., :4] + 0.5 * torch.sign(t[..., :4])  # |pre| >= 0.25: away from the kink
    t.requires_grad_()
    pos = torch.tensor([0, 5, 2])
    assert torch.autograd.gradcheck(lambda x: coca_query_prologue(x, pos, form=form), (q,))
    assert torch.autograd.gradcheck(lambda x: coca_key_prologue(x, pos, form=form), (t,))


@pytest.mark.parametrize("form", ["slack", "strict"])
@pytest.mark.parametrize(
    "dtype, rtol",
    [pytest.param(torch.float32, 1e-6, id="fp32"), pytest.param(torch.bfloat16, 2**-7, id="bf16")],
)
@pytest.mark.parametrize("pos2d", [False, True], ids=["shared-pos", "per-row-pos"])
def test_triton_prologue_matches_torch(monkeypatch, form, dtype, rtol, pos2d):
    """Fused kernels (interpreted on CPU) vs the fp64 torch prologue on the same rounded inputs.

    Both compute in at least fp32, so the only difference is the final rounding of Q', K', dq
    and dt to the input dtype: under one ulp, rtol * max|value| (2^-7 for bf16; one ulp rather
    than half because the Triton interpreter truncates fp32 -> bf16 instead of rounding).
    """
    B, S, H, Hkv, D = 2, 5, 4, 2, 64
    q64 = torch.randn(B, S, H, D, dtype=F64).to(dtype).to(F64)
    t64 = _boundary_t(B, S, Hkv, D).detach().to(dtype).to(F64)
    pos = torch.tensor([[3, 0, 7, 1, 12], [0, 1, 2, 3, 4]]) if pos2d else torch.arange(5) + 9
    gq = torch.randn(B, S, H, D, dtype=F64).to(dtype).to(F64)
    gk = torch.randn(B, S, Hkv, D, dtype=F64).to(dtype).to(F64)
    results = []
    for use_triton, dt in ((False, F64), (True, dtype)):
        monkeypatch.setenv(ENV_VAR, "triton" if use_triton else "torch_blockwise")
        q, t = q64.to(dt).requires_grad_(), t64.to(dt).requires_grad_()
        qp, kp = coca_query_prologue(q, pos, form=form), coca_key_prologue(t, pos, form=form)
        grads = torch.autograd.grad((qp, kp), (q, t), (gq.to(dt), gk.to(dt)))
        results.append((qp, kp, *grads))
    for name, got, want in zip(("Q'", "K'", "dq", "dt"), results[1], results[0]):
        assert got.dtype == dtype and not torch.isnan(got).any(), name
        err, bound = (got.to(F64) - want).abs().max().item(), rtol * want.abs().max().item()
        assert err <= bound + 1e-6, f"{name}: max abs error {err:.3e} > {bound:.3e}"
    assert (results[1][3][..., : D // 2][t64[..., : D // 2] + t64[..., D // 2 :] <= 0] == 0).all()


def test_triton_fast_path_matches_ref(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    q, t, v = _inputs(2, 7, 7, 4, 2, 64, dtype=torch.float32)
    do, dlse = torch.randn(2, 7, 4, 64, dtype=F64), torch.randn(2, 4, 7, dtype=F64)
    q64, t64, v64 = (x.detach().to(F64).requires_grad_() for x in (q, t, v))
    want = _run(coca_attn_ref, q64, t64, v64, do, dlse)
    _assert_close(_run(coca_attn_func, q, t, v, do, dlse), want, 1e-5)


@pytest.mark.parametrize("form", ["slack", "strict"])
def test_prologue_saves_only_its_input_and_tables(form):
    """Backward memory is the input plus the [S, D/2] cos/sin tables, no temporaries."""
    B, S, H, D = 2, 16, 4, 64
    q = torch.randn(B, S, H, D, requires_grad=True)
    t = torch.randn(B, S, H, D, requires_grad=True)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        coca_query_prologue(q, torch.arange(S), form=form)
        coca_key_prologue(t, torch.arange(S), form=form)
    big = [x for x in saved if x.numel() > S * D // 2]
    assert len(big) == 2 and big[0] is q and big[1] is t
    assert sum(x.numel() for x in saved) == 2 * (q.numel() + 2 * S * D // 2)


def test_bf16_prologue_grads_come_back_in_input_dtype():
    q = torch.randn(1, 4, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    qp = coca_query_prologue(q, torch.arange(4))
    (dq,) = torch.autograd.grad(qp.float().sum(), (q,))
    assert qp.dtype == dq.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "shapes, kw, match",
    [
        pytest.param(((1, 4, 2, 7), (1, 4, 2, 7), (1, 4, 2, 7)), {}, "even D", id="odd-D"),
        pytest.param(((1, 4, 2, 8),) * 3, {"rotary_dim": 4, "form": "strict"}, "rotary_dim=4 < D",
                     id="strict-partial-rotary"),
        pytest.param(((1, 4, 2, 8),) * 3, {"rotary_dim": 10}, "rotary_dim=10",
                     id="rotary-dim-gt-D"),
        pytest.param(((1, 4, 2, 8),) * 3, {"form": "loose"}, "form='loose'", id="bad-form"),
        pytest.param(((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {}, "H=3, Hkv=2", id="H%Hkv"),
        pytest.param(((1, 4, 2, 8), (1, 5, 2, 8), (1, 4, 2, 8)), {}, "t.shape", id="t-vs-v"),
        pytest.param(((1, 4, 2, 8), (1, 4, 2, 6), (1, 4, 2, 8)), {}, "t.shape", id="t-D"),
    ],
)
@pytest.mark.parametrize("fn", [coca_attn_func, coca_attn_ref], ids=["func", "ref"])
def test_bad_input_raises(fn, shapes, kw, match):
    q, t, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fn(q, t, v, **kw)


def test_prologue_rejects_bad_positions():
    with pytest.raises(ValueError, match="positions"):
        coca_query_prologue(torch.randn(1, 4, 2, 8), torch.arange(5))
    with pytest.raises(ValueError, match="positions"):
        coca_key_prologue(torch.randn(1, 4, 2, 8), torch.arange(4.0))
