"""`ExtTransformerConfig`: error paths, upstream / Hugging Face field polarity, hybrid presets.

- Every `ValueError` raised by megatron_ext/layers/transformer_config.py, with its message.
- Upstream meaning kept (docs/methods/hybrid.md, "Megatron-core fields"): an int
  `no_rope_freq` N makes every N-th layer NoPE, an int `window_attn_skip_freq` N makes every N-th
  layer full and the others sliding, exactly as Megatron-core's own `is_layer_window_attention`
  decides.
- Polarity against the real Hugging Face config classes (transformers, no weights): Cohere2
  `layer_types` (RoPE only on sliding layers), Llama-4 and SmolLM3 `no_rope_layers` (1 = RoPE)
  versus Megatron `no_rope_freq` (1 = NoPE), read off `layer_attention(i).rope` of configs built
  from the presets by `ext_transformer_config`.
- The `layer_attention(i).kind` sequence of each preset on 8 layers.

All checks are exact (booleans, integers, strings).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from megatron.core.transformer.utils import is_layer_window_attention
from transformers import Cohere2Config, Llama4TextConfig, SmolLM3Config

from megatron_ext.config import load_config
from megatron_ext.layers.transformer_config import ExtTransformerConfig
from megatron_ext.ops import DCAParams
from megatron_ext.specs import ext_transformer_config

BASE = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "use_cpu_initialization": True,
}
DCA = {"attention_variant": "dca", "dca": DCAParams(10, 3)}
HYB = {"attention_variant": "hybrid"}
SWA = {**HYB, "window_size": (3, 0)}
YARN = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}

ERRORS = [
    pytest.param(
        {"attention_variant": "longheads"},
        "attention_variant='longheads'; expected one of rope, nope, hybrid, coca, dca",
        id="variant",
    ),
    pytest.param(
        {"rotary_percent": 0.0}, r"rotary_percent=0.0; expected \(0, 1\]", id="rotary-percent"
    ),
    pytest.param(
        {"rotary_percent": 0.5625},
        r"rotary dim 9 \(kv_channels=16 x rotary_percent=0.5625\) must be even",
        id="rotary-dim-odd",
    ),
    pytest.param(
        {**SWA, "window_attn_skip_freq": 0},
        "window_attn_skip_freq=0; expected a positive int or a per-layer list",
        id="skip-freq-int",
    ),
    pytest.param(
        {**SWA, "window_attn_skip_freq": [1, 0, 1]},
        r"window_attn_skip_freq=\[1, 0, 1\]; expected 4 entries of 0 or 1",
        id="skip-freq-length",
    ),
    pytest.param(
        {**SWA, "window_attn_skip_freq": [1, 0, 2, 1]},
        r"window_attn_skip_freq=\[1, 0, 2, 1\]; expected 4 entries of 0 or 1",
        id="skip-freq-values",
    ),
    pytest.param(
        {**HYB, "window_attn_skip_freq": [1, 1, 1, 0]},
        "window_attn_skip_freq is set but window_size is None",
        id="skip-freq-no-window",
    ),
    pytest.param(
        {**HYB, "window_size": (3, 2)},
        r"window_size=\(3, 2\); only causal sliding windows \(W - 1, 0\) with W >= 1",
        id="window-right",
    ),
    pytest.param(
        {**HYB, "window_size": (-1, 0)}, r"window_size=\(-1, 0\); only causal", id="window-infinite"
    ),
    pytest.param(
        {**HYB, "attention_chunk_size": 6, "chunked_attn_skip_freq": [1, 1]},
        r"chunked_attn_skip_freq=\[1, 1\]; expected 4 entries of 0 or 1",
        id="chunk-freq-length",
    ),
    pytest.param(
        {**HYB, "chunked_attn_skip_freq": [1, 1, 1, 0]},
        "chunked_attn_skip_freq is set but attention_chunk_size is None",
        id="chunk-freq-no-chunk",
    ),
    pytest.param(
        {**HYB, "attention_chunk_size": 0}, "attention_chunk_size=0; expected >= 1", id="chunk-size"
    ),
    pytest.param(
        {"coca_form": "loose"}, "coca_form='loose'; expected 'slack' or 'strict'", id="coca-form"
    ),
    pytest.param(
        {"rope_scaling": {**YARN, "beta": 3.0}},
        r"rope_scaling=\{.*'beta': 3.0\}: .*unexpected keyword argument 'beta'",
        id="rope-scaling-key",
    ),
    pytest.param(
        {"rope_scaling": {"type": "ntk", "factor": 2.0}},
        "RopeScaling.kind='ntk'",
        id="rope-scaling-kind",
    ),
    pytest.param(
        {"rope_scaling": {"type": "yarn", "factor": 2.0}},
        "original_max_position_embeddings=None; yarn scaling needs a positive int",
        id="rope-scaling-l0",
    ),
    pytest.param(
        {"attention_variant": "dca"},
        r"attention_variant='dca' needs dca \(chunk_size, local_size\)",
        id="dca-sizes",
    ),
    pytest.param(
        {**DCA, "dca": SimpleNamespace(chunk_size=10, local_size=10,
                                       original_max_position_embeddings=None)},
        "local_size=10; expected an int with 0 <= local_size < chunk_size=10",
        id="dca-local",
    ),
    pytest.param(
        {"attention_variant": "coca", "coca_form": "strict", "rotary_percent": 0.5},
        "strict CoCA rotates the whole head; rotary_percent=0.5",
        id="coca-partial",
    ),
    pytest.param(
        {**DCA, "dca": SimpleNamespace(chunk_size=10, local_size=3, scaling_factor=2.0,
                                       original_max_position_embeddings=None),
         "rope_scaling": YARN},
        "dca.scaling_factor .* and rope_scaling=.*use one of them",
        id="dca-scaling-and-rope-scaling",
    ),
    pytest.param(
        {**DCA, "qk_l2_norm": True}, "attention_variant='dca' with qk_l2_norm=True", id="dca-l2"
    ),
    pytest.param(
        {"attention_variant": "coca", "qk_l2_norm": True},
        "attention_variant='coca' with qk_l2_norm=True",
        id="coca-l2",
    ),
    pytest.param(
        {"attention_variant": "coca", "window_size": (3, 0)},
        "attention_variant='coca' cannot be combined with window_size or attention_chunk_size",
        id="coca-window",
    ),
    pytest.param(
        {**DCA, "attention_chunk_size": 4},
        "attention_variant='dca' cannot be combined with window_size",
        id="dca-chunk",
    ),
    pytest.param(
        {"window_size": (3, 0)},
        "attention_variant='rope' with per-layer window / chunk / NoPE patterns: use "
        "attention_variant='hybrid'",
        id="rope-window",
    ),
    pytest.param(
        {"attention_variant": "nope", "no_rope_freq": [0, 1, 0, 1]},
        "attention_variant='nope' with per-layer",
        id="nope-pattern",
    ),
    pytest.param(
        {"attention_variant": "coca", "no_rope_freq": [0, 0, 0, 1]},
        "CoCA needs RoPE on every layer; no_rope_freq must be unset",
        id="coca-nope",
    ),
    pytest.param(
        {**SWA, "attention_chunk_size": 6},
        "layer 1: both a sliding window and chunked attention are enabled",
        id="window-and-chunk",
    ),
]


@pytest.mark.parametrize("fields, message", ERRORS)
def test_invalid_config_raises(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExtTransformerConfig(**{**BASE, **fields})


def test_longheads_has_no_megatron_layer() -> None:
    cfg = load_config(None, ["attention.variant=longheads"])
    with pytest.raises(NotImplementedError, match="attention.variant='longheads' is inference"):
        ext_transformer_config(cfg.model, cfg.attention)


def test_int_frequencies_keep_upstream_meaning() -> None:
    """no_rope_freq=4 and window_attn_skip_freq=4 on 8 layers, as Megatron-core reads them."""
    cfg = ExtTransformerConfig(
        **{**BASE, "num_layers": 8, **SWA, "window_attn_skip_freq": 4, "no_rope_freq": 4}
    )
    layers = [cfg.layer_attention(i) for i in range(1, 9)]
    assert cfg.no_rope_freq == [0, 0, 0, 1, 0, 0, 0, 1]  # 1 = NoPE
    assert [not a.rope for a in layers] == [bool(x) for x in cfg.no_rope_freq]
    upstream = [is_layer_window_attention((3, 0), 4, i) for i in range(1, 9)]
    assert upstream == [True, True, True, False] * 2
    assert [a.window is not None for a in layers] == upstream
    assert {a.window for a in layers} == {4, None}  # window_size (W - 1, 0) is W = 4 keys
    listed = ExtTransformerConfig(
        **{**BASE, "num_layers": 8, **SWA, "window_attn_skip_freq": [1, 1, 1, 0] * 2}
    )
    assert [listed.layer_attention(i).window for i in range(1, 9)] == [4, 4, 4, None] * 2


def _preset(preset: str, *extra: str) -> ExtTransformerConfig:
    """The ExtTransformerConfig that a YAML with this hybrid preset on 8 layers builds."""
    cfg = load_config(
        None,
        [
            "model.num_layers=8",
            "attention.variant=hybrid",
            f"attention.hybrid={{preset: {preset}, window: 5, chunk: 6}}",
            *extra,
        ],
    )
    return ext_transformer_config(cfg.model, cfg.attention)


def test_cohere2_polarity() -> None:
    """Cohere2 applies RoPE only on sliding layers: full layers are NoPE."""
    hf = Cohere2Config(num_hidden_layers=8)
    cfg = _preset("cohere2")
    for i, kind in enumerate(hf.layer_types):
        layer = cfg.layer_attention(i + 1)
        assert layer.rope == (kind == "sliding_attention")
        assert (layer.window is not None) == (kind == "sliding_attention")
        assert cfg.no_rope_freq[i] == int(kind == "full_attention")
        assert layer.temperature is None


def test_llama4_polarity() -> None:
    """Llama-4 no_rope_layers[i] = 1 means the layer USES RoPE; Megatron no_rope_freq inverts."""
    hf = Llama4TextConfig(num_hidden_layers=8)
    cfg = _preset("llama4", "attention.qk_norm=l2_post_rope")
    assert hf.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    assert cfg.no_rope_freq == [1 - x for x in hf.no_rope_layers]
    for i, (uses_rope, kind) in enumerate(zip(hf.no_rope_layers, hf.layer_types)):
        layer = cfg.layer_attention(i + 1)
        assert layer.rope == bool(uses_rope)
        assert (layer.chunk is not None) == (kind == "chunked_attention") == layer.rope
        assert layer.qk_l2_norm == layer.rope  # Llama-4 L2 norm on RoPE layers only
        assert layer.temperature == (None if layer.rope else (hf.floor_scale, hf.attn_scale))


def test_smollm3_polarity() -> None:
    """SmolLM3 no_rope_layers has Llama-4's polarity (1 = RoPE); all layers full attention."""
    hf = SmolLM3Config(num_hidden_layers=8)
    cfg = _preset("smollm3")
    assert cfg.no_rope_freq == [1 - x for x in hf.no_rope_layers]
    for i, uses_rope in enumerate(hf.no_rope_layers):
        layer = cfg.layer_attention(i + 1)
        assert layer.rope == bool(uses_rope)
        assert layer.window is None and layer.chunk is None and layer.temperature is None


@pytest.mark.parametrize(
    "preset, extra, kinds",
    [
        pytest.param("cohere2", [], ["rope_swa"] * 3 + ["nope_full"], id="cohere2"),
        pytest.param("llama4", [], ["rope_chunked"] * 3 + ["nope_full"], id="llama4"),
        pytest.param("smollm3", [], ["rope_full"] * 3 + ["nope_full"], id="smollm3"),
        pytest.param(
            "cohere2",
            ["attention.hybrid.nope_every=2"],
            ["rope_swa", "nope_full"] * 2,
            id="cohere2-every-2",
        ),
    ],
)
def test_preset_layer_kinds(preset: str, extra: list[str], kinds: list[str]) -> None:
    cfg = _preset(preset, *extra)
    assert [cfg.layer_attention(i).kind for i in range(1, 9)] == kinds * (8 // len(kinds))


def test_custom_layer_kinds() -> None:
    types = ["rope_swa", "nope_full", "rope_chunked", "rope_full"] * 2
    cfg = load_config(
        None,
        [
            "model.num_layers=8",
            "attention.variant=hybrid",
            f"attention.hybrid={{preset: custom, window: 5, chunk: 6, "
            f"layer_types: [{', '.join(types)}]}}",
        ],
    )
    ext = ext_transformer_config(cfg.model, cfg.attention)
    assert [ext.layer_attention(i).kind for i in range(1, 9)] == types


def test_l2_norm_needs_rope_layers() -> None:
    cfg = load_config(None, ["attention.variant=nope", "attention.qk_norm=l2_post_rope"])
    with pytest.raises(ValueError, match=r"attention_variant='nope' with qk_l2_norm=True"):
        ext_transformer_config(cfg.model, cfg.attention)
