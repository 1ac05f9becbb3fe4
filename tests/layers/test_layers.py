"""Megatron GPTModels built by megatron_ext.specs against a plain-torch reference GPT.

For every attention variant the GPTModel from `build_gpt_model` (local spec, CPU, fp32, TP=1)
and `reference_model.ReferenceGPT` (weights copied from its state dict, attention from the ops'
reference definitions) must give the same logits and the same gradient for every parameter, on a
packed batch with a document boundary inside a row and a document continued from an earlier
sample (positions 37.. at the row start). Weights are redrawn large enough that attention is
peaked (logits of order 10), so a wrong rotation, mask or head grouping changes the logits by
far more than the tolerance; `test_comparison_is_sensitive` checks that for the
position-dependent variants.

Tolerances: the two models run the same fp32 maths in a different order (blockwise online
softmax, fused QKV, merged DCA passes against dense N x N references), so logits (magnitudes
15-25) agree to 1e-5..4e-5: we assert 1e-4 (docs/methods/checks.md, whole-model fp32).
Gradients of a random projection of all logits reach ~500; per parameter they agree to <= 4e-6
of that parameter's largest gradient entry, and we assert max |diff| <= 1e-4 * max |grad|. The
explicit-position attention references are checked against the ops' own references in fp64 to
1e-10 (same maths, fp64 rounding only).

Also here: state-dict keys and parameter counts per variant (CoCA has exactly the rope model's
parameters: `t_proj` is the K slice of `linear_qkv`), and the core-attention class per variant.
"""

from __future__ import annotations

import pytest
import torch
from reference_model import (
    ReferenceGPT,
    chunk_doc_ids,
    coca_attention_at,
    dca_attention_at,
    layer_plans,
)

from megatron_ext.config import load_config
from megatron_ext.layers.coca_attention import CoCACoreAttention, CoCASelfAttention
from megatron_ext.layers.core_attention import ExtCoreAttention
from megatron_ext.layers.dual_chunk_attention import DualChunkCoreAttention
from megatron_ext.layers.forward import gpt_forward
from megatron_ext.ops import attention_ref, coca_attn_ref, dual_chunk_attn_ref
from megatron_ext.ops.documents import document_runs
from megatron_ext.specs import build_gpt_model

VOCAB = 128
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
]
FOUR = ["model.num_layers=4"]
DCA = "attention.dca={chunk_size: 10, local_size: 3}"  # C = 7: divides neither 33 nor 20
DCA_T = "attention.dca={chunk_size: 10, local_size: 3, original_max_position_embeddings: 8}"

VARIANTS = [
    pytest.param(["attention.variant=rope"], id="rope"),
    pytest.param(["attention.variant=nope"], id="nope"),
    pytest.param(["attention.variant=coca"], id="coca-slack"),
    pytest.param(["attention.variant=coca", "attention.coca_form=strict"], id="coca-strict"),
    pytest.param(["attention.variant=dca", DCA], id="dca"),
    pytest.param(["attention.variant=dca", DCA_T], id="dca-temperature"),
    pytest.param(
        [*FOUR, "attention.variant=hybrid", "attention.hybrid={preset: cohere2, window: 5}"],
        id="hybrid-cohere2",
    ),
    pytest.param(
        [
            *FOUR,
            "attention.variant=hybrid",
            "attention.qk_norm=l2_post_rope",
            "attention.hybrid={preset: llama4, chunk: 6, floor_scale: 4}",
        ],
        id="hybrid-llama4",
    ),
    pytest.param(
        [*FOUR, "attention.variant=hybrid", "attention.hybrid={preset: smollm3}"],
        id="hybrid-smollm3",
    ),
    pytest.param(
        [
            *FOUR,
            "attention.variant=hybrid",
            "attention.hybrid={preset: custom, layer_types: [rope_swa, nope_full, "
            "rope_chunked, rope_full], window: 4, chunk: 5, temperature_tuning: true, "
            "floor_scale: 3}",
        ],
        id="hybrid-custom",
    ),
    pytest.param(["attention.qk_norm=layernorm_pre_rope"], id="rope-qk-rmsnorm"),
    pytest.param(
        ["attention.qk_norm=layernorm_pre_rope", "model.normalization=LayerNorm"],
        id="rope-qk-layernorm",
    ),
    pytest.param(
        ["attention.rope_scaling={type: yarn, factor: 4.0, original_max_position_embeddings: 16}"],
        id="rope-yarn",
    ),
    pytest.param(
        [
            "model.activation=gelu",
            "model.add_bias_linear=true",
            "model.tie_embeddings=false",
            "model.normalization=LayerNorm",
        ],
        id="rope-gelu-bias-untied",
    ),
]


def packed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, positions, doc_ids [2, 33].

    Row 0: a document continued from an earlier sample (positions 37..56), then a new document
    (0..12). Row 1: one document 0..32 (five DCA chunks of length 7).
    """
    positions = torch.stack([torch.cat([torch.arange(37, 57), torch.arange(13)]), torch.arange(33)])
    doc_ids = torch.stack([torch.tensor([5] * 20 + [6] * 13), torch.zeros(33, dtype=torch.long)])
    tokens = torch.randint(0, VOCAB, (2, 33))
    return tokens, positions, doc_ids


def build(overrides: list[str]):
    """(run config, GPTModel with redrawn weights) for TINY + overrides."""
    cfg = load_config(None, [*TINY, *overrides])
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=VOCAB)
    with torch.no_grad():  # peaked attention, so positions and masks matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(
                    1 + 0.2 * torch.randn_like(p)
                    if name.endswith("weight")
                    else 0.1 * torch.randn_like(p)
                )
            else:
                p.normal_(0.0, 0.5 if "embedding" in name else 0.2 if "qkv" in name else 0.1)
    return cfg, model


@pytest.mark.parametrize("overrides", VARIANTS)
def test_logits_and_grads_match_reference(megatron_single_process, overrides: list[str]):
    cfg, model = build(overrides)
    ref = ReferenceGPT(cfg.model, cfg.attention, model.state_dict())
    tokens, positions, doc_ids = packed_batch()

    logits = gpt_forward(model, tokens, positions=positions, doc_ids=doc_ids)
    expected = ref(tokens, positions, doc_ids)
    assert logits.shape == (2, 33, VOCAB)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)

    weight = torch.randn_like(expected)
    (logits * weight).sum().backward()
    (expected * weight).sum().backward()
    params = dict(model.named_parameters())
    assert set(params) == set(ref.params)
    for name, p in params.items():
        g_ref = ref.params[name].grad
        assert p.grad is not None and g_ref is not None, name
        scale = g_ref.abs().max().item()
        assert scale > 0, f"{name}: zero gradient"
        err = (p.grad - g_ref).abs().max().item()
        assert err <= 1e-4 * scale, f"{name}: grad error {err:.3g} vs scale {scale:.3g}"


SENSITIVE = [
    pytest.param(["attention.variant=rope"], "halved", id="rope"),
    pytest.param(["attention.variant=coca"], "restarted", id="coca-slack"),
    pytest.param(["attention.variant=dca", DCA_T], "restarted", id="dca-temperature"),
    pytest.param(
        [
            *FOUR,
            "attention.variant=hybrid",
            "attention.qk_norm=l2_post_rope",
            "attention.hybrid={preset: llama4, chunk: 6, floor_scale: 4}",
        ],
        "restarted",
        id="hybrid-llama4",
    ),
]


@pytest.mark.parametrize("overrides, wrong", SENSITIVE)
def test_comparison_is_sensitive(megatron_single_process, overrides: list[str], wrong: str):
    """The reference fed wrong positions or no document boundary must disagree with the
    Megatron logits far beyond the 1e-4 tolerance. Wrong positions: the continued document
    restarted at 0 (CoCA slack, DCA and the Llama-4 chunk grid and temperature are not
    translation-invariant), or for plain RoPE, which is, every position halved."""
    cfg, model = build(overrides)
    ref = ReferenceGPT(cfg.model, cfg.attention, model.state_dict())
    tokens, positions, doc_ids = packed_batch()
    wrong_pos = document_runs(doc_ids)[1] if wrong == "restarted" else positions // 2
    with torch.no_grad():
        logits = gpt_forward(model, tokens, positions=positions, doc_ids=doc_ids)
        for pos, docs in ((wrong_pos, doc_ids), (positions, torch.zeros_like(doc_ids))):
            assert (ref(tokens, pos, docs) - logits).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["attention.variant=rope"], id="rope"),
        pytest.param(["attention.variant=dca", DCA_T], id="dca"),
        pytest.param(["attention.variant=coca"], id="coca"),
    ],
)
def test_no_sequence_info_is_one_document_from_zero(megatron_single_process, overrides):
    """No SequenceInfo (packed_seq_params=None) means positions 0..S-1, one document per row."""
    cfg, model = build(overrides)
    ref = ReferenceGPT(cfg.model, cfg.attention, model.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 19))
    positions = torch.arange(19).expand(2, 19)
    with torch.no_grad():
        logits = model(tokens, positions, None)
        expected = ref(tokens, positions, torch.zeros_like(tokens))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def expected_keys(
    num_layers: int, *, layernorm: bool, qk_norm: bool, bias: bool = False, tied: bool = True
) -> set[str]:
    """The documented state-dict keys of a megatron_ext GPTModel (local spec, TP=1)."""
    norm = ["weight", "bias"] if layernorm else ["weight"]
    linear = ["weight", "_extra_state"] + (["bias"] if bias else [])
    keys = {"embedding.word_embeddings.weight", "output_layer._extra_state"}
    keys |= {f"decoder.final_layernorm.{n}" for n in norm}
    if not tied:
        keys.add("output_layer.weight")
    for i in range(num_layers):
        pre = f"decoder.layers.{i}"
        mods = {
            "input_layernorm": norm,
            "pre_mlp_layernorm": norm,
            "self_attention.linear_qkv": linear,
            "self_attention.linear_proj": linear,
            "mlp.linear_fc1": linear,
            "mlp.linear_fc2": linear,
        }
        if qk_norm:
            mods |= {"self_attention.q_layernorm": norm, "self_attention.k_layernorm": norm}
        keys |= {f"{pre}.{m}.{n}" for m, names in mods.items() for n in names}
    return keys


def expected_params(
    L: int,
    hidden: int,
    heads: int,
    groups: int,
    ffn: int,
    vocab: int,
    *,
    layernorm: bool,
    qk_norm: bool,
    bias: bool = False,
    tied: bool = True,
    swiglu: bool = True,
) -> int:
    """Parameter count: embedding (+ output layer if untied) + L x (norms + QKV + proj + MLP
    [+ q/k norms]) + final norm; MLP fc1 is [gate; up] (2 x ffn rows) with SwiGLU."""
    D = hidden // heads
    norm = (2 if layernorm else 1) * hidden
    fc1 = (2 if swiglu else 1) * ffn
    qkv = (hidden + bias) * (heads + 2 * groups) * D
    proj = heads * D * hidden + bias * hidden
    mlp = (hidden + bias) * fc1 + ffn * hidden + bias * hidden
    qk = 2 * (2 if layernorm else 1) * D if qk_norm else 0
    emb = vocab * hidden * (1 if tied else 2)
    return emb + L * (2 * norm + qkv + proj + mlp + qk) + norm


RMS, LN = {"layernorm": False}, {"layernorm": True}
KEYS = [
    pytest.param(["attention.variant=rope"], 2, RMS, id="rope"),
    pytest.param(["attention.variant=nope"], 2, RMS, id="nope"),
    pytest.param(["attention.variant=coca"], 2, RMS, id="coca"),
    pytest.param(["attention.variant=dca", DCA], 2, RMS, id="dca"),
    pytest.param(
        [
            *FOUR,
            "attention.variant=hybrid",
            "attention.hybrid={preset: cohere2, window: 5}",
            "model.normalization=LayerNorm",
        ],
        4,
        LN,
        id="cohere2",
    ),
    pytest.param(
        [
            *FOUR,
            "attention.variant=hybrid",
            "attention.qk_norm=l2_post_rope",
            "attention.hybrid={preset: llama4, chunk: 6}",
        ],
        4,
        RMS,
        id="llama4",
    ),
    pytest.param(
        ["attention.qk_norm=layernorm_pre_rope"], 2, {**RMS, "qk_norm": True}, id="rope-qk-norm"
    ),
    pytest.param(
        ["attention.qk_norm=layernorm_pre_rope", "model.normalization=LayerNorm"],
        2,
        {**LN, "qk_norm": True},
        id="rope-qk-layernorm",
    ),
    pytest.param(
        [
            "attention.variant=dca",
            DCA,
            "model.activation=gelu",
            "model.add_bias_linear=true",
            "model.tie_embeddings=false",
            "model.normalization=LayerNorm",
        ],
        2,
        {**LN, "bias": True, "tied": False, "swiglu": False},
        id="dca-gelu-bias-untied",
    ),
]


@pytest.mark.parametrize("overrides, layers, kind", KEYS)
def test_state_dict_keys_and_param_count(megatron_single_process, overrides, layers, kind):
    """No variant adds parameters: L2 QK-norm, temperature, windows, DCA and CoCA are free."""
    _, model = build(overrides)
    arch = {"qk_norm": False, **kind}
    swiglu = arch.pop("swiglu", True)
    assert set(model.state_dict()) == expected_keys(layers, **arch)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_params(layers, 64, 4, 2, 256, VOCAB, swiglu=swiglu, **arch)


def test_coca_has_the_rope_parameters(megatron_single_process):
    """CoCA's t_proj is the K slice of linear_qkv: same keys, shapes and count as rope."""
    _, rope = build(["attention.variant=rope"])
    _, coca = build(["attention.variant=coca"])
    shapes = {k: tuple(v.shape) for k, v in rope.named_parameters()}
    assert {k: tuple(v.shape) for k, v in coca.named_parameters()} == shapes
    assert set(coca.state_dict()) == set(rope.state_dict())
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 16, 64)
    attn = coca.decoder.layers[0].self_attention
    assert isinstance(attn, CoCASelfAttention)
    assert isinstance(attn.core_attention, CoCACoreAttention)


@pytest.mark.parametrize(
    "overrides, core",
    [
        pytest.param(["attention.variant=rope"], ExtCoreAttention, id="rope"),
        pytest.param(["attention.variant=nope"], ExtCoreAttention, id="nope"),
        pytest.param(
            [*FOUR, "attention.variant=hybrid", "attention.hybrid={preset: smollm3}"],
            ExtCoreAttention,
            id="hybrid",
        ),
        pytest.param(["attention.variant=dca", DCA], DualChunkCoreAttention, id="dca"),
        pytest.param(["attention.variant=coca"], CoCACoreAttention, id="coca"),
    ],
)
def test_core_attention_per_variant(megatron_single_process, overrides, core: type):
    _, model = build(overrides)
    layers = model.decoder.layers
    assert [type(layer.self_attention.core_attention) for layer in layers] == [core] * len(layers)


@pytest.mark.parametrize("overrides", [p for p in VARIANTS if p.id.startswith("hybrid")])
def test_megatron_layers_resolve_like_the_reference_plan(megatron_single_process, overrides):
    """Each core attention's resolved layer (from ExtTransformerConfig) is what the reference
    reads from the YAML sections: RoPE or NoPE, window, chunk, temperature, L2 QK-norm."""
    cfg, model = build(overrides)
    got = [layer.self_attention.core_attention.layer for layer in model.decoder.layers]
    plans = layer_plans(cfg.model, cfg.attention)
    assert [(a.rope, a.window, a.chunk, a.temperature, a.qk_l2_norm) for a in got] == [
        (p.attention == "rope", p.window, p.chunk, p.temperature, p.l2_post_rope) for p in plans
    ]
    assert len(set(plans)) > 1  # a real mix of layer kinds


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """positions restarting at 0 per document (what the ops references assume), doc_ids."""
    doc_ids = torch.tensor([[0] * 9 + [1] * 17 + [2] * 4, [3] * 30])
    return document_runs(doc_ids)[1], doc_ids


@pytest.mark.parametrize("form", ["slack", "strict"])
def test_explicit_position_coca_matches_ops_ref(form: str):
    positions, doc_ids = _rows()
    q = torch.randn(2, 30, 4, 16, dtype=torch.float64)
    t, v = (torch.randn(2, 30, 2, 16, dtype=torch.float64) for _ in range(2))
    expected = coca_attn_ref(q, t, v, form=form, doc_ids=doc_ids)
    got = coca_attention_at(q, t, v, positions, doc_ids, form=form, theta=10000.0)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "l_o", [pytest.param(None, id="no-temperature"), pytest.param(6, id="temperature")]
)
def test_explicit_position_dca_matches_ops_ref(l_o: int | None):
    positions, doc_ids = _rows()
    q = torch.randn(2, 30, 4, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 30, 2, 16, dtype=torch.float64) for _ in range(2))
    sizes = {"chunk_size": 7, "local_size": 2}
    expected = dual_chunk_attn_ref(
        q, k, v, doc_ids=doc_ids, original_max_position_embeddings=l_o, **sizes
    )
    got = dca_attention_at(
        q, k, v, positions, doc_ids, theta=10000.0, original_max_position_embeddings=l_o, **sizes
    )
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_chunk_doc_ids_match_ops_chunk_mask():
    positions, doc_ids = _rows()
    q = torch.randn(2, 30, 4, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 30, 2, 16, dtype=torch.float64) for _ in range(2))
    expected, _ = attention_ref(q, k, v, chunk=4, doc_ids=doc_ids)
    got, _ = attention_ref(q, k, v, doc_ids=chunk_doc_ids(positions, doc_ids, 4))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
