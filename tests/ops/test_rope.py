"""RoPE checks R1-R4 of docs/methods/checks.md, plus partial rotary, inverse, adjoint, QK norms.

Compared: ``apply_rope`` against itself under a position shift (R1, fp64 so 1e-10 is reachable);
against transformers' Llama ``apply_rotary_pos_emb`` with HF's own cos/sin, and scaled inverse
frequencies against HF's ``ROPE_INIT_FUNCTIONS`` (R2; fp32 with small positions, so the fp32
angle error p * 6e-8 stays below 1e-6); scaling variants that must reduce to default RoPE
(R3, exact or 1e-12 in fp64); Llama-4 temperature at the published points (R4, 1e-7: the
values are quoted to 7 decimals). The QK norms (docs/methods/rope.md) are compared with their
formulas written out in fp64 (1e-12).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.ops.rope import (
    RopeScaling,
    apply_rope,
    interleaved_to_rotate_half_perm,
    llama4_attn_temperature,
    permute_interleaved_to_rotate_half,
    rope_cos_sin,
    rope_inv_freq,
)

F64 = torch.float64


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] x [B, S, H, D] -> [B, H, S, S] dot products."""
    return torch.einsum("bqhd,bkhd->bhqk", q, k)


@pytest.mark.parametrize(
    "rotary_dim, scaling",
    [
        pytest.param(None, None, id="default"),
        pytest.param(24, None, id="partial24"),
        pytest.param(None, RopeScaling("linear", factor=4.0), id="linear4"),
        pytest.param(
            None, RopeScaling("yarn", factor=8.0, original_max_position_embeddings=512), id="yarn8"
        ),
    ],
)
def test_r1_relative_property(rotary_dim: int | None, scaling: RopeScaling | None) -> None:
    q = torch.randn(1, 9, 2, 64, dtype=F64)
    k = torch.randn(1, 9, 2, 64, dtype=F64)
    pos = torch.tensor([0, 3, 17, 100, 511, 1000, 2047, 4000, 9999])
    kw = dict(rotary_dim=rotary_dim, scaling=scaling)
    ref = _scores(apply_rope(q, pos, **kw), apply_rope(k, pos, **kw))
    for shift in (1, 1234, 50_000):
        got = _scores(apply_rope(q, pos + shift, **kw), apply_rope(k, pos + shift, **kw))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def _hf_config(rope_parameters: dict, head_dim: int = 32, max_pos: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
        max_position_embeddings=max_pos, rope_parameters=rope_parameters,
    )  # fmt: skip


def test_r2_matches_hf_llama_rotary() -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    theta = 500000.0
    cfg = _hf_config({"rope_type": "default", "rope_theta": theta})
    q, k = torch.randn(2, 40, 3, 32), torch.randn(2, 40, 1, 32)
    pos = torch.stack([torch.arange(40), torch.arange(40) + 7])  # [B, S]
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch.testing.assert_close(
        apply_rope(q, pos, theta=theta), hq.transpose(1, 2), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        apply_rope(k, pos, theta=theta), hk.transpose(1, 2), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    "params, scaling, seq_len",
    [
        pytest.param(
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
            RopeScaling("yarn", factor=4.0, original_max_position_embeddings=256),
            None,
            id="yarn",
        ),
        pytest.param(
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 256,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
            },
            RopeScaling(
                "yarn",
                factor=4.0,
                original_max_position_embeddings=256,
                mscale=0.707,
                mscale_all_dim=1.0,
                beta_fast=16.0,
                beta_slow=2.0,
            ),
            None,
            id="yarn-mscale",
        ),  # fmt: skip
        pytest.param(
            {"rope_type": "dynamic", "factor": 2.0},
            RopeScaling("dynamic", factor=2.0, original_max_position_embeddings=256),
            1000,
            id="dynamic-L1000",
        ),
        pytest.param(
            {"rope_type": "linear", "factor": 3.0},
            RopeScaling("linear", factor=3.0),
            None,
            id="linear",
        ),  # fmt: skip
    ],
)
def test_r2_inv_freq_matches_hf(params: dict, scaling: RopeScaling, seq_len: int | None) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _hf_config(
        {"rope_theta": 10000.0, **params}, max_pos=1024 if "yarn" in params["rope_type"] else 256
    )
    hf_inv, hf_attn = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq_len)
    inv, attn = rope_inv_freq(32, theta=10000.0, scaling=scaling, seq_len=seq_len)
    torch.testing.assert_close(inv, hf_inv.float(), rtol=1e-6, atol=0)
    assert attn == pytest.approx(hf_attn, rel=1e-12)


def _interleaved_rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """GPT-J / Llama-4 complex form: pairs (2i, 2i+1) rotated by pos * theta^(-2i/D)."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=F64) / D)
    ang = pos.to(F64)[:, None] * inv  # [S, D/2]
    rot = torch.polar(torch.ones_like(ang), ang)[None, :, None, :]
    xc = torch.view_as_complex(x.to(F64).reshape(*x.shape[:-1], D // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(x.shape).to(x.dtype)


def test_r2_interleaved_weight_permutation_keeps_scores() -> None:
    H, D, hidden, S = 2, 16, 24, 12
    wq, wk = torch.randn(H * D, hidden) / hidden**0.5, torch.randn(H * D, hidden) / hidden**0.5
    x, pos = torch.randn(1, S, hidden), torch.arange(S)
    proj = lambda w, xx: (xx @ w.T).view(1, S, H, D)  # noqa: E731
    ref = _scores(_interleaved_rope(proj(wq, x), pos), _interleaved_rope(proj(wk, x), pos))
    wq2 = permute_interleaved_to_rotate_half(wq, H, D)
    wk2 = permute_interleaved_to_rotate_half(wk, H, D)
    got = _scores(apply_rope(proj(wq2, x), pos), apply_rope(proj(wk2, x), pos))
    # fp32 scores of size ~3: one fp32 ulp of the sum is ~2e-7, hence a relative 1e-6.
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # Without the permutation the scores differ: the check is not vacuous.
    bad = _scores(apply_rope(proj(wq, x), pos), apply_rope(proj(wk, x), pos))
    assert (bad - ref).abs().max() > 1e-2


def test_interleaved_perm_layout() -> None:
    assert interleaved_to_rotate_half_perm(6).tolist() == [0, 2, 4, 1, 3, 5]
    assert interleaved_to_rotate_half_perm(8, rotary_dim=4).tolist() == [0, 2, 1, 3, 4, 5, 6, 7]


def test_r3_scalings_reduce_to_default() -> None:
    x = torch.randn(2, 33, 2, 32, dtype=F64)
    pos = torch.arange(33)
    ref = apply_rope(x, pos)
    assert torch.equal(apply_rope(x, pos, scaling=RopeScaling("linear", factor=1.0)), ref)
    dyn = RopeScaling("dynamic", factor=4.0, original_max_position_embeddings=64)
    assert torch.equal(apply_rope(x, pos, scaling=dyn), ref)  # L = 33 <= L0 = 64
    assert torch.equal(apply_rope(x, pos, scaling=dyn, seq_len=64), ref)
    assert not torch.allclose(apply_rope(x, pos, scaling=dyn, seq_len=65), ref)
    yarn1 = RopeScaling("yarn", factor=1.0, original_max_position_embeddings=64)
    torch.testing.assert_close(apply_rope(x, pos, scaling=yarn1), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "scaling, expected",
    [
        pytest.param(
            RopeScaling(
                "yarn", factor=1.0, original_max_position_embeddings=64, attention_factor=1.7
            ),
            1.7,
            id="explicit",
        ),  # fmt: skip
        pytest.param(
            RopeScaling("yarn", factor=16.0, original_max_position_embeddings=64),
            0.1 * math.log(16.0) + 1,
            id="from-factor",
        ),  # fmt: skip
    ],
)
def test_r3_yarn_attention_factor_squared_in_logits(scaling: RopeScaling, expected: float) -> None:
    q, k = torch.randn(1, 20, 2, 32, dtype=F64), torch.randn(1, 20, 2, 32, dtype=F64)
    pos = torch.arange(20)
    inv, attn = rope_inv_freq(32, scaling=scaling, dtype=F64)
    assert attn == pytest.approx(expected, rel=1e-15)
    unit = RopeScaling(**{**scaling.__dict__, "attention_factor": 1.0})  # same freqs, a = 1
    got = _scores(apply_rope(q, pos, scaling=scaling), apply_rope(k, pos, scaling=scaling))
    ref = _scores(apply_rope(q, pos, scaling=unit), apply_rope(k, pos, scaling=unit))
    torch.testing.assert_close(got, expected**2 * ref, rtol=1e-12, atol=1e-12)


def test_r4_llama4_temperature() -> None:
    p = torch.tensor([0, 8190, 8191, 16383, 100000])
    want = torch.tensor([1.0, 1.0, 1.0693147, 1.1098612, 1.2564949], dtype=F64)
    got = llama4_attn_temperature(p, dtype=F64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_partial_rotary_passes_dims_through() -> None:
    x = torch.randn(2, 7, 3, 64, dtype=F64)
    pos = torch.arange(7) * 5
    y = apply_rope(x, pos, rotary_dim=16)
    assert torch.equal(y[..., 16:], x[..., 16:])
    torch.testing.assert_close(y[..., :16], apply_rope(x[..., :16], pos), rtol=0, atol=0)
    assert (y[..., :16] - x[..., :16]).abs().max() > 1e-3


def test_inverse_undoes_and_is_adjoint() -> None:
    x, g = torch.randn(2, 11, 2, 32, dtype=F64), torch.randn(2, 11, 2, 32, dtype=F64)
    pos = torch.randint(0, 5000, (2, 11))
    torch.testing.assert_close(
        apply_rope(apply_rope(x, pos), pos, inverse=True), x, rtol=0, atol=1e-12
    )
    # inverse=True is the transpose of the forward map, also with a YaRN factor a != 1,
    # so it is the exact backward: d<apply(x), g>/dx = apply(g, inverse=True).
    yarn = RopeScaling("yarn", factor=8.0, original_max_position_embeddings=128)
    xr = x.clone().requires_grad_()
    (apply_rope(xr, pos, scaling=yarn) * g).sum().backward()
    torch.testing.assert_close(
        xr.grad, apply_rope(g, pos, scaling=yarn, inverse=True), rtol=0, atol=1e-12
    )


def test_cos_sin_shapes_and_dtype() -> None:
    cos, sin = rope_cos_sin(torch.arange(5), 8, dtype=torch.bfloat16)
    assert cos.shape == sin.shape == (5, 8) and cos.dtype == torch.bfloat16
    cos, _ = rope_cos_sin(torch.zeros(2, 5, dtype=torch.long), 8)
    assert cos.shape == (2, 5, 8) and torch.equal(cos, torch.ones(2, 5, 8))


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda x, p: apply_rope(x, p, rotary_dim=7), "rotary_dim=7", id="odd-dim"),
        pytest.param(lambda x, p: apply_rope(x, p, rotary_dim=64), "rotary_dim=64", id="dim>D"),
        pytest.param(lambda x, p: apply_rope(x, p.float()), "integer", id="float-pos"),
        pytest.param(lambda x, p: apply_rope(x, p[:3]), r"positions.shape", id="pos-len"),
        pytest.param(lambda x, p: apply_rope(x[0], p), r"x.shape", id="x-3d"),
        pytest.param(lambda x, p: RopeScaling("ntk"), "kind='ntk'", id="kind"),
        pytest.param(
            lambda x, p: RopeScaling("yarn", factor=2.0), "original_max_position", id="yarn-L0"
        ),
        pytest.param(
            lambda x, p: RopeScaling("dynamic", factor=0.5, original_max_position_embeddings=8),
            "factor=0.5",
            id="dyn-factor",
        ),  # fmt: skip
        pytest.param(
            lambda x, p: RopeScaling(
                "yarn",
                factor=2.0,
                original_max_position_embeddings=8,
                beta_fast=1.0,
                beta_slow=32.0,
            ),
            "beta_fast",
            id="betas",
        ),  # fmt: skip
        pytest.param(lambda x, p: apply_rope(x, p, theta=1.0), "theta", id="theta"),
    ],
)
def test_bad_inputs_raise(call, match: str) -> None:
    x, p = torch.randn(1, 5, 2, 32), torch.arange(5)
    with pytest.raises(ValueError, match=match):
        call(x, p)


def test_qk_l2_norm_matches_llama4_formula() -> None:
    from megatron_ext.ops.qk_norm import l2_norm_post_rope

    x = torch.randn(2, 5, 3, 16, dtype=F64)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(l2_norm_post_rope(x, 1e-5), want, rtol=0, atol=1e-14)
    assert l2_norm_post_rope(x.bfloat16(), 1e-5).dtype == torch.bfloat16


def test_head_layer_norm_per_head() -> None:
    from megatron_ext.ops.qk_norm import head_layer_norm

    x, w, b = (
        torch.randn(2, 5, 3, 16, dtype=F64),
        torch.randn(16, dtype=F64),
        torch.randn(16, dtype=F64),
    )
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mu) / torch.sqrt(var + 1e-5) * w + b
    torch.testing.assert_close(head_layer_norm(x, w, b), want, rtol=0, atol=1e-12)
    rms = head_layer_norm(x, w, kind="rmsnorm")
    torch.testing.assert_close(rms, x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w)
    with pytest.raises(ValueError, match="weight.shape"):
        head_layer_norm(x, torch.ones(8, dtype=F64))
    with pytest.raises(ValueError, match="kind="):
        head_layer_norm(x, kind="batchnorm")


@pytest.mark.parametrize("dim, theta, l0", [(64, 500000.0, 8192), (16, 10000.0, 64)])
def test_llama3_scaling_matches_transformers(dim: int, theta: float, l0: int) -> None:
    """Llama-3.1 frequencies against transformers' own rope initialisation (fp32)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": l0,
              "rope_theta": theta}
    cfg = LlamaConfig(hidden_size=dim * 2, num_attention_heads=2, rope_parameters=params)
    want, attn = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours, factor = rope_inv_freq(
        dim, theta=theta, scaling=RopeScaling("llama3", 8.0, original_max_position_embeddings=l0)
    )
    assert factor == attn == 1.0
    torch.testing.assert_close(ours, want.float(), rtol=1e-6, atol=0)
    plain, _ = rope_inv_freq(dim, theta=theta)
    assert (ours < plain).any() and (ours == plain).any()  # both bands are exercised
