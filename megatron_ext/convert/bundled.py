"""Export with bundled modelling code (`model_type` megatron_ext, `auto_map`).

Any model the bundled code (`remote/modeling_megatron_ext.py`) can run exactly: CoCA, DCA,
hybrid patterns in any order (sequential or parallel block). The config carries our `model` and
`attention` sections verbatim, so the import back is exact; a DCA model also gets the HF
`dual_chunk_attention_config` key.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from megatron_ext.config import AttentionConfig, ConfigError, ModelConfig
from megatron_ext.convert.errors import ConversionError
from megatron_ext.typed_yaml import from_dict, to_dict

__all__ = ["from_bundled_config", "to_bundled_config", "write_bundled_code"]

_REMOTE = Path(__file__).parent / "remote"
_FILES = ("configuration_megatron_ext.py", "modeling_megatron_ext.py")
AUTO_MAP = {"AutoConfig": "configuration_megatron_ext.MegatronExtConfig",
            "AutoModelForCausalLM": "modeling_megatron_ext.MegatronExtForCausalLM"}


def _check(model: ModelConfig, attn: AttentionConfig) -> None:
    why = None
    if model.activation != "swiglu" or model.add_bias_linear:
        why = "only SwiGLU MLPs without linear biases"
    elif model.normalization == "LayerNorm" and not model.parallel_block:
        why = "LayerNorm (with bias) layers of a sequential block"
    elif attn.qk_norm == "layernorm_pre_rope":
        why = "a learnable pre-RoPE q/k LayerNorm"
    elif attn.variant == "longheads":
        why = "LongHeads (an inference method; export the RoPE model)"
    elif attn.dca is not None and (attn.dca.scaling_factor != 1.0
                                   or attn.dca.extension_factor is not None):
        why = "DCA scaling_factor / extension_factor"
    elif attn.rope_scaling is not None and attn.rope_scaling.type == "llama3":
        why = "llama3 RoPE scaling (export the family's own format instead)"
    if why:
        raise ConversionError(f"the bundled modelling code does not implement {why}")


def to_bundled_config(model: ModelConfig, attn: AttentionConfig,
                      extra: dict[str, Any]) -> dict[str, Any]:
    """config.json of a bundled-code export."""
    _check(model, attn)
    if model.vocab_size is None:
        raise ConversionError("model.vocab_size is unset; the export needs the vocabulary size")
    from megatron_ext.convert.hf_config import _layer_types

    keep = ("bos_token_id", "eos_token_id", "pad_token_id")
    out: dict[str, Any] = {k: extra[k] for k in keep if k in extra}
    out.update(model_type="megatron_ext", architectures=["MegatronExtForCausalLM"],
               auto_map=dict(AUTO_MAP), megatron_ext_model=to_dict(model),
               megatron_ext_attention=to_dict(attn),
               megatron_ext_layer_types=_layer_types(model, attn),
               vocab_size=model.vocab_size, tie_word_embeddings=model.tie_embeddings)
    if attn.variant == "dca":
        from megatron_ext.convert.hf_config import _dca_to_hf

        out["dual_chunk_attention_config"] = _dca_to_hf(attn.dca, extra)
    return out


def from_bundled_config(hf: dict[str, Any]):
    """HFSpec of a bundled-code config."""
    from megatron_ext.convert.hf_config import HFSpec

    try:
        model = from_dict(ModelConfig, hf["megatron_ext_model"])
        attn = from_dict(AttentionConfig, hf["megatron_ext_attention"])
    except KeyError as e:
        raise ConversionError(f"config.json (megatron_ext) has no {e}") from e
    except ConfigError as e:
        raise ConversionError(f"config.json (megatron_ext): {e}") from e
    extra = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "dtype")
             if k in hf}
    return HFSpec("megatron_ext", model, attn, extra)


def write_bundled_code(out: Path) -> None:
    """Copy the modelling files into the export directory."""
    for name in _FILES:
        tmp = out / f".{name}.tmp"
        shutil.copyfile(_REMOTE / name, tmp)
        tmp.replace(out / name)
