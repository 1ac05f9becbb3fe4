"""HF `config.json` <-> megatron_ext `model` / `attention` sections, per family.

Supported `model_type`s: llama, qwen2, smollm3, llama4_text (dense layers), cohere2, and our
bundled `megatron_ext` code (CoCA, DCA, any hybrid). Every key of the HF config is either mapped
to a field of ours, kept verbatim as a pass-through field (token ids, dtype, MoE-only sizes of a
dense model, DCA sparse keys) or equal to the family's default; anything else is refused naming
the key. Polarities (docs/conversion.md):

- HF `no_rope_layers[i]` = 1 means layer i USES RoPE (SmolLM3, Llama-4);
- Cohere2 applies RoPE only on `sliding_attention` layers (full layers are NoPE);
- Llama-4 `layer_types` "chunked_attention" = chunked-local with `attention_chunk_size`;
- HF `sliding_window = W` keys including the query = our `hybrid.window`.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

from megatron_ext.config import (
    AttentionConfig,
    ConfigError,
    DCAConfig,
    HybridConfig,
    ModelConfig,
    RopeScalingConfig,
)
from megatron_ext.convert.errors import ConversionError

__all__ = ["FAMILIES", "HFSpec", "choose_family", "from_hf_config", "to_hf_config"]

FAMILIES = ("llama", "qwen2", "smollm3", "llama4_text", "cohere2", "megatron_ext")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "smollm3": "SmolLM3ForCausalLM", "llama4_text": "Llama4ForCausalLM",
                 "cohere2": "Cohere2ForCausalLM", "megatron_ext": "MegatronExtForCausalLM"}
INTERLEAVED = ("llama4_text", "cohere2")

# Keys that describe the checkpoint, not the network: kept as they are.
_META = {"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path",
         "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "output_hidden_states",
         "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
         "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "model_type",
         "auto_map", "sep_token_id", "decoder_start_token_id", "tokenizer_class",
         "cross_attention_hidden_size", "add_cross_attention", "finetuning_task",
         "task_specific_params", "prefix", "tf_legacy_loss", "pruned_heads", "torchscript",
         "use_bfloat16", "output_scores", "return_dict_in_generate"}
# Llama-4 MoE-only fields: meaningless for a model without MoE layers, kept as they are.
_LLAMA4_MOE = {"intermediate_size", "num_local_experts", "num_experts_per_tok",
               "interleave_moe_layer_step", "output_router_logits", "router_aux_loss_coef",
               "router_jitter_noise"}
_DCA_SPARSE = ("sparse_attention_config", "sparse_attention_enabled",
               "sparse_attention_threshold", "sparse_attention_last_q")


@dataclass
class HFSpec:
    """An HF config understood: family, our sections, and pass-through fields."""

    family: str
    model: ModelConfig
    attention: AttentionConfig
    extra: dict[str, Any] = field(default_factory=dict)


def _defaults(model_type: str) -> dict[str, Any]:
    if model_type == "megatron_ext":
        return {}
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]().to_dict()


class _Fields:
    """The HF dict with a record of what has been consumed."""

    def __init__(self, hf: dict[str, Any]) -> None:
        self.hf, self.used = hf, set()

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.hf.get(key, default)

    def need(self, key: str) -> Any:
        self.used.add(key)
        if key not in self.hf:
            raise ConversionError(f"config.json has no {key!r}; the {self.hf['model_type']} "
                                  "converter needs it")
        return self.hf[key]

    def require(self, key: str, allowed: Any, reason: str) -> None:
        value = self.get(key, allowed)
        if value != allowed:
            raise ConversionError(f"config.json {key}={value!r}: {reason} (only {allowed!r} "
                                  "converts)")


def _rope_from_hf(f: _Fields, max_pos: int) -> tuple[float, RopeScalingConfig | None, float]:
    rp = f.get("rope_parameters") or {}
    if not rp and f.hf.get("rope_theta") is not None:
        rp = {"rope_theta": f.get("rope_theta"), **(f.get("rope_scaling") or {})}
    return _parse_rope(dict(rp), max_pos, f.get("partial_rotary_factor", 1.0))


def _parse_rope(rp: dict[str, Any], max_pos: int,
                partial_default: float | None = 1.0) -> tuple[float, RopeScalingConfig | None,
                                                               float]:
    rp = dict(rp)
    theta = float(rp.pop("rope_theta", 10000.0))
    kind = rp.pop("rope_type", rp.pop("type", "default"))
    partial = float(rp.pop("partial_rotary_factor", partial_default or 1.0))
    scaling = None
    allowed = {"default": (), "linear": ("factor",),
               "dynamic": ("factor", "original_max_position_embeddings"),
               "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                        "attention_factor", "mscale", "mscale_all_dim", "truncate"),
               "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
                          "high_freq_factor")}
    if kind not in allowed:
        raise ConversionError(
            f"config.json rope_parameters.rope_type={kind!r}: megatron_ext's RoPE implements "
            f"{', '.join(allowed)}; this scaling cannot be carried")
    extra = sorted(set(rp) - set(allowed[kind]))
    if extra:
        raise ConversionError(f"config.json rope_parameters: {', '.join(extra)} not understood "
                              f"for rope_type={kind!r}")
    for key, ok in (("mscale", None), ("mscale_all_dim", None), ("truncate", True)):
        if rp.get(key, ok) != ok:
            raise ConversionError(f"config.json rope_parameters.{key}={rp[key]!r}: not carried "
                                  f"by megatron_ext's YaRN (only {ok!r})")
    if kind != "default":
        l0 = rp.get("original_max_position_embeddings")
        factor = rp.get("factor")
        if factor is None and kind == "yarn" and l0:
            factor = max_pos / l0
        if factor is None:
            raise ConversionError(f"config.json rope_parameters (rope_type={kind!r}) has no "
                                  "factor")
        scaling = RopeScalingConfig(
            type=kind, factor=float(factor), original_max_position_embeddings=l0,
            beta_fast=float(rp.get("beta_fast") or 32.0),
            beta_slow=float(rp.get("beta_slow") or 1.0),
            attention_factor=rp.get("attention_factor"),
            low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rp.get("high_freq_factor", 4.0)))
    return theta, scaling, partial


def _rope_to_hf(attn: AttentionConfig, original: dict[str, Any] | None = None,
                max_pos: int = 0) -> dict[str, Any]:
    """HF `rope_parameters`; the source's own dict when it means the same (exact round trip)."""
    if original is not None:
        with contextlib.suppress(ConversionError, ConfigError, TypeError, ValueError):
            if _parse_rope(original, max_pos) == (attn.rope_theta, attn.rope_scaling,
                                                  attn.rotary_percent):
                return dict(original)
    out: dict[str, Any] = {"rope_theta": attn.rope_theta, "rope_type": "default"}
    rs = attn.rope_scaling
    if rs is not None:
        out.update(rope_type=rs.type, factor=rs.factor)
        if rs.original_max_position_embeddings is not None:
            out["original_max_position_embeddings"] = rs.original_max_position_embeddings
        if rs.type == "llama3":
            out.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
        if rs.type == "yarn":
            out.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow)
            if rs.attention_factor is not None:
                out["attention_factor"] = rs.attention_factor
        elif (rs.beta_fast, rs.beta_slow, rs.attention_factor) != (32.0, 1.0, None):
            raise ConversionError(f"attention.rope_scaling beta/attention_factor set for "
                                  f"type={rs.type!r}: HF reads them only for yarn")
    if attn.rotary_percent != 1.0:
        out["partial_rotary_factor"] = attn.rotary_percent
    return out


def _dca_from_hf(f: _Fields, extra: dict[str, Any]) -> DCAConfig | None:
    d = f.get("dual_chunk_attention_config")
    if not d:
        return None
    d = dict(d)
    if d.get("sparse_attention_enabled"):
        raise ConversionError("config.json dual_chunk_attention_config.sparse_attention_enabled"
                              "=true: sparse DCA is not implemented by megatron_ext")
    sparse = {k: d.pop(k) for k in _DCA_SPARSE if k in d}
    if sparse:
        extra["dual_chunk_attention_config"] = sparse
    unknown = sorted(set(d) - {"chunk_size", "local_size", "original_max_position_embeddings"})
    if unknown:
        raise ConversionError(f"config.json dual_chunk_attention_config: {', '.join(unknown)} "
                              "not understood")
    try:
        return DCAConfig(chunk_size=int(d["chunk_size"]), local_size=int(d["local_size"]),
                         original_max_position_embeddings=d.get(
                             "original_max_position_embeddings") or None)
    except KeyError as e:
        raise ConversionError(f"config.json dual_chunk_attention_config has no {e}") from e


def _dca_to_hf(dca: DCAConfig, extra: dict[str, Any]) -> dict[str, Any]:
    if dca.scaling_factor != 1.0 or dca.extension_factor is not None:
        name = "scaling_factor" if dca.scaling_factor != 1.0 else "extension_factor"
        raise ConversionError(f"attention.dca.{name}={getattr(dca, name)!r}: HF "
                              "dual_chunk_attention_config has no such field (ChunkLlama knob)")
    out = {"chunk_size": dca.chunk_size, "local_size": dca.local_size,
           "original_max_position_embeddings": dca.original_max_position_embeddings or 0}
    out.update(extra.get("dual_chunk_attention_config", {}))
    return out


def _model_from_hf(f: _Fields, *, ffn_key: str = "intermediate_size",
                   eps_key: str = "rms_norm_eps", **kw: Any) -> ModelConfig:
    hidden, heads = f.need("hidden_size"), f.need("num_attention_heads")
    head_dim = f.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ConversionError(f"config.json head_dim={head_dim} differs from hidden_size / "
                              f"num_attention_heads = {hidden // heads}; megatron_ext models "
                              "use hidden_size / num_attention_heads")
    act = f.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) converts")
    if f.get("attention_dropout", 0.0):
        raise ConversionError(f"config.json attention_dropout={f.hf['attention_dropout']}: "
                              "megatron_ext kernels need 0")
    return ModelConfig(
        num_layers=f.need("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=f.get("num_key_value_heads") or heads,
        ffn_hidden_size=f.need(ffn_key), vocab_size=f.need("vocab_size"),
        max_position_embeddings=f.need("max_position_embeddings"),
        layernorm_epsilon=float(f.get(eps_key, 1e-6)),
        init_method_std=float(f.get("initializer_range", 0.02)),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)), **kw)


def _hybrid(types: list[str], **kw: Any) -> HybridConfig:
    return HybridConfig(preset="custom", layer_types=types, **kw)  # type: ignore[arg-type]


def from_hf_config(hf: dict[str, Any]) -> HFSpec:
    """Our sections from an HF config dict (`config.json` contents).

    Raises:
        ConversionError: naming every key that cannot be carried.
    """
    hf = copy.deepcopy(hf)
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise ConversionError(f"config.json model_type={mt!r}; supported: {', '.join(FAMILIES)}")
    if mt == "megatron_ext":
        from megatron_ext.convert.bundled import from_bundled_config

        return from_bundled_config(hf)
    f = _Fields(hf)
    extra: dict[str, Any] = {}
    try:
        spec = _FROM[mt](f, extra)
    except ConfigError as e:
        raise ConversionError(f"config.json ({mt}) gives an invalid megatron_ext config: {e}") \
            from e
    defaults = _defaults(mt)
    for key, value in hf.items():
        if key in f.used:
            continue
        if key in _META or (mt == "llama4_text" and key in _LLAMA4_MOE):
            extra[key] = value
        elif key in defaults and defaults[key] == value:
            continue
        else:
            raise ConversionError(f"config.json {key}={value!r} is not carried by the {mt} "
                                  "converter (it differs from the family default "
                                  f"{defaults.get(key, '<absent>')!r})")
    if isinstance(hf.get("rope_parameters"), dict):
        extra["rope_parameters"] = hf["rope_parameters"]
    spec.extra = extra
    return spec


def _llama(f: _Fields, extra: dict) -> HFSpec:
    f.require("attention_bias", False, "Megatron biases q, k, v and o together only with "
              "add_bias_linear; HF Llama attention_bias is not mapped")
    f.require("mlp_bias", False, "MLP biases are not mapped")
    f.require("pretraining_tp", 1, "pretraining_tp only changes HF's matmul order")
    model = _model_from_hf(f)
    return _rope_family("llama", f, model, extra)


def _rope_family(family: str, f: _Fields, model: ModelConfig, extra: dict) -> HFSpec:
    theta, scaling, partial = _rope_from_hf(f, model.max_position_embeddings)
    dca = _dca_from_hf(f, extra)
    attn = AttentionConfig(variant="dca" if dca else "rope", rope_theta=theta,
                           rope_scaling=scaling, rotary_percent=partial, dca=dca)
    return HFSpec(family, model, attn)


def _no_sliding(f: _Fields) -> None:
    f.require("use_sliding_window", False, "HF sliding-window layers of this family are not "
              "mapped (use a hybrid model)")
    f.get("sliding_window")
    f.get("max_window_layers")
    types = f.get("layer_types")
    if types and any(t != "full_attention" for t in types):
        raise ConversionError(f"config.json layer_types={types}: only 'full_attention' layers "
                              "convert for this family")


def _qwen2(f: _Fields, extra: dict) -> HFSpec:
    _no_sliding(f)
    for key in ("sliding_window", "max_window_layers"):
        if key in f.hf:
            extra[key] = f.hf[key]
    model = _model_from_hf(f, add_qkv_bias=True)
    return _rope_family("qwen2", f, model, extra)


def _smollm3(f: _Fields, extra: dict) -> HFSpec:
    _no_sliding(f)
    f.require("attention_bias", False, "attention biases are not mapped")
    f.require("mlp_bias", False, "MLP biases are not mapped")
    if "sliding_window" in f.hf:
        extra["sliding_window"] = f.hf["sliding_window"]
    model = _model_from_hf(f)
    n = model.num_layers
    flags = f.get("no_rope_layers") or [1] * n
    if "no_rope_layer_interval" in f.hf:  # HF reads no_rope_layers; the interval is kept as is
        extra["no_rope_layer_interval"] = f.get("no_rope_layer_interval")
    if len(flags) != n:
        raise ConversionError(f"config.json no_rope_layers has {len(flags)} entries, "
                              f"num_hidden_layers={n}")
    theta, scaling, partial = _rope_from_hf(f, model.max_position_embeddings)
    types = ["rope_full" if flag else "nope_full" for flag in flags]  # 1 = uses RoPE
    if all(t == "rope_full" for t in types):
        attn = AttentionConfig(variant="rope", rope_theta=theta, rope_scaling=scaling,
                               rotary_percent=partial)
    else:
        attn = AttentionConfig(variant="hybrid", rope_theta=theta, rope_scaling=scaling,
                               rotary_percent=partial, hybrid=_hybrid(types))
    return HFSpec("smollm3", model, attn)


def _llama4(f: _Fields, extra: dict) -> HFSpec:
    moe = f.get("moe_layers")
    if moe:
        raise ConversionError(f"config.json moe_layers={moe}: Llama-4 MoE layers are not "
                              "converted (dense layers only; set moe_layers=[])")
    f.require("attention_bias", False, "attention biases are not mapped")
    model = _model_from_hf(f, ffn_key="intermediate_size_mlp")
    n = model.num_layers
    flags = f.get("no_rope_layers") or [1] * n
    if "no_rope_layer_interval" in f.hf:  # HF reads no_rope_layers; the interval is kept as is
        extra["no_rope_layer_interval"] = f.get("no_rope_layer_interval")
    hf_types = f.get("layer_types") or ["full_attention"] * n
    chunk = f.get("attention_chunk_size")
    if len(flags) != n or len(hf_types) != n:
        raise ConversionError(f"config.json no_rope_layers / layer_types lengths "
                              f"{len(flags)} / {len(hf_types)}, num_hidden_layers={n}")
    types = []
    for i, (flag, t) in enumerate(zip(flags, hf_types, strict=True)):
        if t not in ("full_attention", "chunked_attention"):
            raise ConversionError(f"config.json layer_types[{i}]={t!r}; Llama-4 text converts "
                                  "'full_attention' and 'chunked_attention'")
        if t == "chunked_attention" and not flag:
            raise ConversionError(f"config.json layer {i}: chunked_attention on a NoPE layer "
                                  "(no_rope_layers[i]=0) is not expressible")
        types.append(("rope_chunked" if t == "chunked_attention" else "rope_full")
                     if flag else "nope_full")
    if "rope_chunked" in types and not chunk:
        raise ConversionError("config.json layer_types has chunked_attention but "
                              "attention_chunk_size is not set")
    theta, scaling, partial = _rope_from_hf(f, model.max_position_embeddings)
    hy = _hybrid(types, chunk=chunk if "rope_chunked" in types else None,
                 temperature_tuning=bool(f.get("attn_temperature_tuning", True)),
                 floor_scale=int(f.get("floor_scale", 8192)),
                 attn_scale=float(f.get("attn_scale", 0.1)))
    if chunk and "rope_chunked" not in types:
        extra["attention_chunk_size"] = chunk
    attn = AttentionConfig(variant="hybrid", rope_theta=theta, rope_scaling=scaling,
                           rotary_percent=partial, hybrid=hy,
                           qk_norm="l2_post_rope" if f.get("use_qk_norm", True) else "none")
    return HFSpec("llama4_text", model, attn)


def _cohere2(f: _Fields, extra: dict) -> HFSpec:
    f.require("attention_bias", False, "attention biases are not mapped")
    model = _model_from_hf(f, eps_key="layer_norm_eps", normalization="LayerNorm",
                           parallel_block=True, logit_scale=float(f.get("logit_scale", 1.0)))
    n = model.num_layers
    hf_types = f.get("layer_types")
    if "sliding_window_pattern" in f.hf:
        extra["sliding_window_pattern"] = f.get("sliding_window_pattern")
    if not hf_types or len(hf_types) != n:
        raise ConversionError(f"config.json layer_types={hf_types!r}; expected {n} entries")
    window = f.get("sliding_window")
    types = []
    for i, t in enumerate(hf_types):
        if t not in ("sliding_attention", "full_attention"):
            raise ConversionError(f"config.json layer_types[{i}]={t!r}; Cohere2 converts "
                                  "'sliding_attention' and 'full_attention'")
        types.append("rope_swa" if t == "sliding_attention" else "nope_full")
    if "rope_swa" not in types:
        extra["sliding_window"] = window
    theta, scaling, partial = _rope_from_hf(f, model.max_position_embeddings)
    hy = _hybrid(types, window=window if "rope_swa" in types else None)
    attn = AttentionConfig(variant="hybrid", rope_theta=theta, rope_scaling=scaling,
                           rotary_percent=partial, hybrid=hy)
    return HFSpec("cohere2", model, attn)


_FROM = {"llama": _llama, "qwen2": _qwen2, "smollm3": _smollm3, "llama4_text": _llama4,
         "cohere2": _cohere2}


# ---------------------------------------------------------------------------- ours -> HF


def _layer_types(model: ModelConfig, attn: AttentionConfig) -> list[str]:
    if attn.variant == "hybrid":
        assert attn.hybrid is not None
        return list(attn.hybrid.resolve(model.num_layers))
    kind = "nope_full" if attn.variant == "nope" else "rope_full"
    return [kind] * model.num_layers


def _why_not(family: str, model: ModelConfig, attn: AttentionConfig) -> str | None:
    """None if `family` expresses the config exactly, else the reason it does not."""
    if family == "megatron_ext":
        return None
    if attn.variant == "coca":
        return "CoCA's t projection and collinear scores exist only in the bundled code"
    if attn.variant == "longheads":
        return "LongHeads is an inference method; export the underlying RoPE model"
    types = set(_layer_types(model, attn))
    hy = attn.hybrid
    temp = hy is not None and hy.use_temperature and "nope_full" in types
    if model.activation != "swiglu" or model.add_bias_linear:
        return "only SwiGLU MLPs without linear biases are mapped"
    if attn.qk_norm == "layernorm_pre_rope":
        return "a learnable pre-RoPE q/k LayerNorm has no field in this family"
    cohere = family == "cohere2"
    if model.parallel_block != cohere or (model.logit_scale != 1.0 and not cohere):
        return ("Cohere2 layers are parallel blocks with a logit scale; the other families "
                "are sequential")
    if model.normalization != ("LayerNorm" if cohere else "RMSNorm"):
        return f"normalization {model.normalization!r} differs from the family's"
    if model.add_qkv_bias != (family == "qwen2"):
        return "q/k/v biases exist exactly in Qwen2"
    if attn.variant == "dca" and family not in ("llama", "qwen2"):
        return "dual_chunk_attention_config is read for Llama / Qwen2 exports"
    if family in ("llama", "qwen2"):
        if types != {"rope_full"} or attn.qk_norm != "none":
            return f"layer types {sorted(types)} / qk_norm need a hybrid family"
    elif family == "smollm3":
        if not types <= {"rope_full", "nope_full"} or attn.qk_norm != "none" or temp:
            return "SmolLM3 has only full-attention RoPE and NoPE layers, no temperature"
    elif family == "llama4_text":
        if not types <= {"rope_full", "rope_chunked", "nope_full"}:
            return f"Llama-4 has no layer type among {sorted(types - {'rope_full'})}"
        if attn.qk_norm == "none" and "rope_full" not in types and "rope_chunked" not in types:
            return "no RoPE layer"
    elif family == "cohere2" and (not types <= {"rope_swa", "nope_full"}
                                  or attn.qk_norm != "none" or temp):
        return ("Cohere2 layers are RoPE + sliding window or NoPE + full attention, "
                f"got {sorted(types)}")
    return None


def choose_family(model: ModelConfig, attn: AttentionConfig, family: str | None = None) -> str:
    """The HF family an export uses: `family` if given and able, else the first that is.

    Raises:
        ConversionError: `family` cannot express the config (with the reason).
    """
    if family is not None:
        if family not in FAMILIES:
            raise ConversionError(f"family={family!r}; expected one of {', '.join(FAMILIES)}")
        why = _why_not(family, model, attn)
        if why:
            raise ConversionError(f"this model cannot be exported as {family}: {why}; "
                                  "export with the bundled code (family 'megatron_ext')")
        return family
    for cand in ("llama", "qwen2", "smollm3", "llama4_text", "cohere2"):
        if _why_not(cand, model, attn) is None:
            return cand
    return "megatron_ext"


def to_hf_config(model: ModelConfig, attn: AttentionConfig, family: str,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF config dict of `family` for our sections (call `choose_family` first)."""
    extra = dict(extra or {})
    if family == "megatron_ext":
        from megatron_ext.convert.bundled import to_bundled_config

        return to_bundled_config(model, attn, extra)
    why = _why_not(family, model, attn)
    if why:
        raise ConversionError(f"cannot export as {family}: {why}")
    if model.vocab_size is None:
        raise ConversionError("model.vocab_size is unset; the export needs the vocabulary size")
    out: dict[str, Any] = {k: v for k, v in extra.items()
                           if k not in ("dual_chunk_attention_config", "rope_parameters")}
    out.update(
        model_type=family, architectures=[ARCHITECTURES[family]],
        num_hidden_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups or model.num_attention_heads,
        vocab_size=model.vocab_size, max_position_embeddings=model.max_position_embeddings,
        initializer_range=model.init_method_std, tie_word_embeddings=model.tie_embeddings,
        hidden_act="silu", rope_parameters=_rope_to_hf(attn, extra.get("rope_parameters"),
                                                        model.max_position_embeddings),
    )
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    out["layer_norm_eps" if family == "cohere2" else "rms_norm_eps"] = model.layernorm_epsilon
    out["intermediate_size_mlp" if family == "llama4_text" else "intermediate_size"] = ffn
    if family in ("llama", "llama4_text", "cohere2"):
        out["head_dim"] = model.head_dim
    if attn.variant == "dca":
        assert attn.dca is not None
        out["dual_chunk_attention_config"] = _dca_to_hf(attn.dca, extra)
    types = _layer_types(model, attn)
    if family == "smollm3":
        flags = [int(t == "rope_full") for t in types]
        out["no_rope_layers"] = flags
        out["no_rope_layer_interval"] = extra.get("no_rope_layer_interval", _interval(flags, 4))
    elif family == "llama4_text":
        hy = attn.hybrid
        flags = [int(t != "nope_full") for t in types]
        out.update(no_rope_layers=flags, moe_layers=[],
                   no_rope_layer_interval=extra.get("no_rope_layer_interval",
                                                    _interval(flags, 4)),
                   layer_types=["chunked_attention" if t == "rope_chunked" else "full_attention"
                                for t in types],
                   use_qk_norm=attn.qk_norm == "l2_post_rope",
                   attn_temperature_tuning=bool(hy and hy.use_temperature),
                   floor_scale=hy.floor_scale if hy else 8192,
                   attn_scale=hy.attn_scale if hy else 0.1)
        chunk = hy.chunk if hy and hy.chunk else extra.get("attention_chunk_size")
        out["attention_chunk_size"] = chunk
    elif family == "cohere2":
        hy = attn.hybrid
        out.update(logit_scale=model.logit_scale,
                   layer_types=["sliding_attention" if t == "rope_swa" else "full_attention"
                                for t in types],
                   sliding_window=hy.window if hy and hy.window else extra.get("sliding_window"))
        if "sliding_window_pattern" in extra:  # legacy key, kept consistent with layer_types
            out["sliding_window_pattern"] = _interval([int(t == "rope_swa") for t in types],
                                                      extra["sliding_window_pattern"])
    return out


def _interval(flags: list[int], fallback: int) -> int:
    """N such that flags[i] == int((i + 1) % N != 0) for all i, else `fallback`."""
    for n in range(1, len(flags) + 2):
        if all(flag == int((i + 1) % n != 0) for i, flag in enumerate(flags)):
            return n
    return fallback
