"""CoCA prologues: turn (q, t) into the (Q', K') of an ordinary attention, with exact backward.

Follows README.md ("The factorisation and why it is exact", "Prologue backward"). Slack:
``Q' = q ⊙ RoPE(q)``, ``K' = RoPE(concat(tau, tau))``; strict: ``Q'' = RoPE(concat(|q_i|^2, 0))``,
``K'' = RoPE(concat(tau, 0))``, with ``tau = ReLU((t[:D/2] + t[D/2:]) / 2)``. Then
``<Q'_m, K'_n> / sqrt(D)`` is the CoCA logit, so any exact attention kernel finishes the job.

The autograd Function keeps only its input (q or t) and the cos/sin tables, and applies the
closed-form backward of README.md instead of autograd through the temporaries, so the memory
held for backward is the size of q and t. On CUDA the same maths runs as one fused Triton pass
per direction (``triton_prologue.py``). Maths run in fp32 (fp64 for fp64 inputs); outputs and
gradients come back in the input dtype. ``K'`` depends only on the key's own position, which is
why a KV cache stores it (``coca_key_prologue``) and context parallelism ships it instead of K.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.backend import resolve_prologue
from megatron_ext.ops.coca import triton_prologue
from megatron_ext.ops.documents import document_runs
from megatron_ext.ops.rope import RopeScaling, rope_cos_sin

__all__ = [
    "COCA_FORMS",
    "coca_key_prologue",
    "coca_positions",
    "coca_query_prologue",
    "coca_rope_seq_len",
    "coca_tau",
]

COCA_FORMS = ("slack", "strict")



def _check_form(form: str) -> bool:
    """Validate ``form``; return True for the strict form."""
    if form not in COCA_FORMS:
        raise ValueError(f"form={form!r}; expected one of {COCA_FORMS}")
    return form == "strict"


def _check_head_dim(D: int, rotary_dim: int | None, strict: bool = False) -> bool:
    """Validate D and rotary_dim; return True for partial rotary (rotary_dim < D)."""
    if D < 2 or D % 2:
        raise ValueError(f"head dim D={D}; CoCA needs an even D (RoPE planes (i, i + D/2))")
    if rotary_dim is None or rotary_dim == D:
        return False
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2 \
            or rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"rotary_dim={rotary_dim!r}; expected an even int in [2, D={D}]")
    if strict:
        raise ValueError(
            f"rotary_dim={rotary_dim} < D={D} with form='strict': partial rotary follows the "
            "GPT-NeoX release, which computes the slack form; use form='slack'"
        )
    return True


def _partial_rope(x: torch.Tensor, positions, theta, scaling, rotary_dim, seq_len):
    """RoPE of the first rotary_dim dims (the rest pass through), in the compute dtype."""
    from megatron_ext.ops.rope import apply_rope

    xc = x.to(_compute_dtype(x))
    return apply_rope(xc, positions.to(x.device), theta=theta, rotary_dim=rotary_dim,
                      scaling=scaling, seq_len=seq_len)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tables(
    x: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    scaling: RopeScaling | None,
    seq_len: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the D/2 planes of x's rows: contiguous [1 or B, S, D/2] in the compute dtype."""
    if x.dim() != 4:
        raise ValueError(f"x.shape={tuple(x.shape)}; expected [B, S, H, D]")
    B, S, _, D = x.shape
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point:
        raise ValueError(f"positions={positions!r}; expected an integer tensor [S] or [B, S]")
    if (
        positions.shape[-1] != S
        or positions.dim() not in (1, 2)
        or (positions.dim() == 2 and positions.shape[0] not in (1, B))
    ):
        raise ValueError(
            f"positions.shape={tuple(positions.shape)}; expected [{S}] or [{B}, {S}] for a "
            f"tensor of shape {tuple(x.shape)}"
        )
    cos, sin = rope_cos_sin(
        positions.to(x.device),
        D,
        theta=theta,
        scaling=scaling,
        dtype=_compute_dtype(x),
        seq_len=seq_len,
    )
    # rope_cos_sin repeats the D/2 angles twice (HF layout); one copy is enough here.
    return tuple(tab[..., : D // 2].reshape(-1, S, D // 2).contiguous() for tab in (cos, sin))


def coca_positions(
    Sq: int, Sk: int, *, q_offset: int = 0, doc_ids: torch.Tensor | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions of the query rows and the keys.

    Query row r sits at absolute index ``q_offset + r`` among the Sk keys. Without doc_ids the
    positions are those indices; with doc_ids [B, Sk] they restart at 0 in each document (a
    maximal run of equal ids) and the query rows take the positions of indices
    ``q_offset .. q_offset + Sq - 1``.

    Args:
        Sq: query rows.
        Sk: keys.
        q_offset: absolute index of query row 0 (>= 0).
        doc_ids: optional int tensor [B, Sk].
        device: device of the result when doc_ids is None.

    Returns:
        (pos_q, pos_k): int64 tensors [Sq] and [Sk], or [B, Sq] and [B, Sk] with doc_ids.
    """
    if q_offset < 0:
        raise ValueError(f"q_offset={q_offset}; expected >= 0")
    if doc_ids is None:
        pos_k = torch.arange(Sk, device=device)
        return torch.arange(q_offset, q_offset + Sq, device=device), pos_k
    if doc_ids.dim() != 2 or doc_ids.shape[1] != Sk:
        raise ValueError(f"doc_ids.shape={tuple(doc_ids.shape)}; expected [B, Sk={Sk}]")
    if q_offset + Sq > Sk:
        raise ValueError(
            f"q_offset={q_offset}, Sq={Sq}; with doc_ids the query rows must lie inside the "
            f"Sk={Sk} keys (q_offset + Sq <= Sk)"
        )
    pos_k = document_runs(doc_ids)[1]
    return pos_k[:, q_offset : q_offset + Sq], pos_k


def coca_rope_seq_len(
    pos_q: torch.Tensor, pos_k: torch.Tensor, scaling: RopeScaling | None
) -> int | None:
    """Dynamic-NTK length L shared by queries and keys: largest position + 1 (None otherwise).

    Queries and keys must use the same theta', so L is taken over both position tensors.
    """
    if scaling is None or scaling.kind != "dynamic":
        return None
    top = [int(p.max().item()) for p in (pos_q, pos_k) if p.numel()]
    return max(top) + 1 if top else 1


def coca_tau(t: torch.Tensor) -> torch.Tensor:
    """CoCA constraint coefficient ``tau = ReLU((t[..., :D/2] + t[..., D/2:]) / 2)``.

    Mean of the two dims of each rotate-half RoPE plane, then ReLU (released-code order).
    Plain torch, differentiable by autograd.

    Args:
        t: [..., D] output of ``t_proj`` (D even), usually [B, S, Hkv, D].

    Returns:
        [..., D/2] tensor, >= 0, same dtype as t.
    """
    D = t.shape[-1]
    _check_head_dim(D, None)
    t1, t2 = t.split(D // 2, dim=-1)
    return torch.relu((t1 + t2) / 2)


# The torch expressions below write each half of the result in place (out=, addcmul_) rather
# than building a tree of temporaries: on CPU the prologue is memory-bound, and this halves the
# passes over q and t. Each line names the README.md formula it evaluates.


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.split(x.shape[-1] // 2, dim=-1)


def _query_fwd(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, strict: bool):
    (q1, q2), out = _halves(q), torch.empty_like(q)
    o1, o2 = _halves(out)
    if strict:  # Q''[i] = |q_i|^2 c, Q''[i + D/2] = |q_i|^2 s
        torch.mul(q1, q1, out=o1).addcmul_(q2, q2)
        torch.mul(o1, sin, out=o2)
        o1.mul_(cos)
    else:  # Q'[i] = q[i] (q[i] c - q[i+D/2] s), Q'[i + D/2] = q[i+D/2] (q[i+D/2] c + q[i] s)
        torch.mul(q1, cos, out=o1).addcmul_(q2, sin, value=-1).mul_(q1)
        torch.mul(q2, cos, out=o2).addcmul_(q1, sin).mul_(q2)
    return out


def _query_bwd(q, cos, sin, g, strict: bool) -> torch.Tensor:
    (q1, q2), (g1, g2), dq = _halves(q), _halves(g), torch.empty_like(q)
    d1, d2 = _halves(dq)
    if strict:  # da = g1 c + g2 s; dq[i] = 2 q[i] da, dq[i + D/2] = 2 q[i+D/2] da
        da = torch.mul(g1, cos).addcmul_(g2, sin).mul_(2)
        torch.mul(q1, da, out=d1)
        torch.mul(q2, da, out=d2)
    else:  # dq = dQ' ⊙ RoPE(q) + RoPE^-1(dQ' ⊙ q), expanded per plane:
        # dq[i] = g1 (2 q1 c - q2 s) + g2 q2 s;  dq[i + D/2] = g2 (2 q2 c + q1 s) - g1 q1 s
        cos2 = 2 * cos
        cross2 = torch.mul(g2, q2).mul_(sin)
        cross1 = torch.mul(g1, q1).mul_(sin)
        torch.mul(q1, cos2, out=d1).addcmul_(q2, sin, value=-1).mul_(g1).add_(cross2)
        torch.mul(q2, cos2, out=d2).addcmul_(q1, sin).mul_(g2).sub_(cross1)
    return dq


def _key_planes(cos: torch.Tensor, sin: torch.Tensor, strict: bool):
    """Per-plane factors (a, b) with K[i] = tau a, K[i + D/2] = tau b."""
    return (cos, sin) if strict else (cos - sin, cos + sin)


def _key_fwd(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, strict: bool):
    (t1, t2), out = _halves(t), torch.empty_like(t)
    o1, o2 = _halves(out)
    a, b = _key_planes(cos, sin, strict)
    tau = torch.add(t1, t2).div_(2).clamp_(min=0)  # ReLU((t1 + t2) / 2)
    torch.mul(tau, a, out=o1)
    torch.mul(tau, b, out=o2)
    return out


def _key_bwd(t, cos, sin, g, strict: bool) -> torch.Tensor:
    (t1, t2), (g1, g2), dt = _halves(t), _halves(g), torch.empty_like(t)
    a, b = _key_planes(cos, sin, strict)
    # dtau = sum of the halves of RoPE^-1(dK') (slack) or first half of RoPE^-1(dK'') (strict)
    dpre = torch.mul(g1, a).addcmul_(g2, b).div_(2)
    dpre.masked_fill_(torch.add(t1, t2).div_(2) <= 0, 0)  # ReLU gate, same test as forward
    d1, d2 = _halves(dt)
    d1.copy_(dpre)
    d2.copy_(dpre)
    return dt


def _use_triton(x: torch.Tensor) -> bool:
    return resolve_prologue(x) == "triton"


def _torch_prologue(x, cos, sin, is_key: bool, strict: bool, grad=None) -> torch.Tensor:
    """Forward (grad None) or backward of a prologue in plain torch, in the tables' dtype."""
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [Bp, S, 1, D/2], broadcast over heads
    x = x.to(cos.dtype)
    if grad is None:
        return _key_fwd(x, c, s, strict) if is_key else _query_fwd(x, c, s, strict)
    g = grad.to(cos.dtype)
    return _key_bwd(x, c, s, g, strict) if is_key else _query_bwd(x, c, s, g, strict)


class _CoCAPrologueFunc(torch.autograd.Function):
    """q -> Q' / Q'' or t -> K' / K''; backward is the closed form of README.md.

    Saves only the input and the [Bp, S, D/2] cos/sin tables. CUDA tensors use the fused Triton
    kernels of ``triton_prologue.py``, everything else the torch expressions above.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, is_key, strict):
        ctx.save_for_backward(x, cos, sin)
        ctx.is_key, ctx.strict = is_key, strict
        if _use_triton(x):
            return triton_prologue.coca_prologue_fwd(x, cos, sin, is_key=is_key, strict=strict)
        return _torch_prologue(x, cos, sin, is_key, strict).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, cos, sin = ctx.saved_tensors
        if _use_triton(x):
            dx = triton_prologue.coca_prologue_bwd(
                x, cos, sin, g, is_key=ctx.is_key, strict=ctx.strict
            )
        else:
            dx = _torch_prologue(x, cos, sin, ctx.is_key, ctx.strict, grad=g).to(x.dtype)
        return dx, None, None, None, None


def coca_query_prologue(
    q: torch.Tensor,
    positions: torch.Tensor,
    *,
    form: str = "slack",
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    rotary_dim: int | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Query side of the CoCA factorisation.

    slack: ``Q' = q ⊙ RoPE(q, positions)``; strict: ``Q'' = RoPE(concat(|q_i|^2, 0), positions)``
    with ``|q_i|^2 = q[i]^2 + q[i + D/2]^2``. Differentiable (closed-form backward).

    Args:
        q: [B, S, H, D] un-rotated queries, D even.
        positions: int tensor [S] or [B, S], absolute (per-document) positions of the rows.
        form: "slack" (released code, default) or "strict" (paper Eq. 9).
        theta: RoPE base.
        scaling: optional RopeScaling (YaRN's attention factor is applied once here).
        rotary_dim: None or D (the whole head), or fewer dims (GPT-NeoX ``rotary_pct`` < 1,
            slack form only): Q'_d = q_d (R q)_d on the first rotary_dim dims, q_d^2 on the rest.
        seq_len: dynamic-NTK length L, default max(positions) + 1; pass the same L as for keys.

    Returns:
        [B, S, H, D] tensor in q's dtype.
    """
    strict = _check_form(form)
    if _check_head_dim(q.shape[-1], rotary_dim, strict):  # GPT-NeoX partial rotary, autograd
        q_rot = _partial_rope(q, positions, theta, scaling, rotary_dim, seq_len)
        return (q.to(q_rot.dtype) * q_rot).to(q.dtype)
    cos, sin = _tables(q, positions, theta, scaling, seq_len)
    return _CoCAPrologueFunc.apply(q, cos, sin, False, strict)


def coca_key_prologue(
    t: torch.Tensor,
    positions: torch.Tensor,
    *,
    form: str = "slack",
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
    rotary_dim: int | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Key side of the CoCA factorisation: what a KV cache stores and context parallelism ships.

    slack: ``K' = RoPE(concat(tau, tau), positions)``; strict: ``K'' = RoPE(concat(tau, 0),
    positions)``, with ``tau = coca_tau(t)``. Differentiable (closed-form backward).

    Args:
        t: [B, S, Hkv, D] raw ``t_proj`` output, D even.
        positions: int tensor [S] or [B, S], absolute (per-document) positions of the keys.
        form: "slack" (default) or "strict".
        theta: RoPE base.
        scaling: optional RopeScaling.
        rotary_dim: None or D, or fewer dims (slack only): tau from the whole head, duplicated,
            then RoPE on the first rotary_dim dims (the rest pass through).
        seq_len: dynamic-NTK length L, default max(positions) + 1; pass the same L as for queries.

    Returns:
        [B, S, Hkv, D] tensor in t's dtype.
    """
    strict = _check_form(form)
    if _check_head_dim(t.shape[-1], rotary_dim, strict):  # GPT-NeoX partial rotary, autograd
        tau = coca_tau(t.to(_compute_dtype(t)))
        t_dup = torch.cat((tau, tau), dim=-1)  # tau from the whole head, then partial rotary
        return _partial_rope(t_dup, positions, theta, scaling, rotary_dim, seq_len).to(t.dtype)
    cos, sin = _tables(t, positions, theta, scaling, seq_len)
    return _CoCAPrologueFunc.apply(t, cos, sin, True, strict)
