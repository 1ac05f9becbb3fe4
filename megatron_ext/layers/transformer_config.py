"""`ExtTransformerConfig`: Megatron-core's `TransformerConfig` plus the long-context fields.

Upstream fields keep their upstream meaning (docs/methods/hybrid.md, "Megatron-core fields"):
- `no_rope_freq`: int N (every N-th layer is NoPE) or list per layer, **1 = NoPE** (skip RoPE);
- `window_size`: (left, right) with -1 = infinite; HF `sliding_window = W` is (W - 1, 0);
- `window_attn_skip_freq`: int N (1-based layers with layer_number % N == 0 are full) or list
  per layer, **1 = sliding window**;
- `qk_layernorm`: learnable norm on q and k *before* RoPE (Megatron applies it before our core
  attention, which is where RoPE happens);
- `qk_l2_norm`: Llama-4 L2 norm, which we apply *after* RoPE on RoPE layers only (Llama-4
  `use_qk_norm`); our spec therefore never adds Megatron's own L2Norm module.

Our fields: the attention variant, RoPE base / fraction / scaling (GPTModel's own rotary module
is not used: RoPE is applied inside our core attention at explicit positions), chunked-local
attention (`attention_chunk_size`, `chunked_attn_skip_freq`: list, 1 = chunked), Llama-4
temperature tuning on NoPE layers, CoCA form, DCA sizes, and document masking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.ops.dual_chunk import DCAParams
from megatron_ext.ops.rope import RopeScaling

VARIANTS = ("rope", "nope", "hybrid", "coca", "dca")


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention does (resolved from the config for a 1-based layer number)."""

    rope: bool
    window: int | None  # HF convention: W keys including the query
    chunk: int | None
    temperature: tuple[int, float] | None  # (floor_scale, attn_scale) on NoPE layers
    qk_l2_norm: bool

    @property
    def kind(self) -> str:
        pos = "rope" if self.rope else "nope"
        if self.window is not None:
            return f"{pos}_swa"
        if self.chunk is not None:
            return f"{pos}_chunked"
        return f"{pos}_full"


def _per_layer(value: int | list[int] | None, num_layers: int, name: str) -> list[int] | None:
    """Expand an upstream-style int skip frequency N into the per-layer list (1 = windowed or
    chunked). As upstream `window_attn_skip_freq`: every N-th layer is skipped (0, full
    attention) and the others get 1."""
    if value is None:
        return None
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name}={value}; expected a positive int or a per-layer list")
        return [0 if (i + 1) % value == 0 else 1 for i in range(num_layers)]
    values = list(value)
    if len(values) != num_layers or any(v not in (0, 1) for v in values):
        raise ValueError(f"{name}={values}; expected {num_layers} entries of 0 or 1")
    return values


@dataclass
class ExtTransformerConfig(TransformerConfig):
    """TransformerConfig with megatron_ext's attention variants (see module docstring)."""

    attention_variant: str = "rope"
    """rope | nope | hybrid | coca | dca. hybrid = per-layer RoPE/NoPE/window/chunk pattern given
    by no_rope_freq, window_size + window_attn_skip_freq, attention_chunk_size +
    chunked_attn_skip_freq. dca and coca apply to RoPE layers (NoPE layers stay plain causal)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rotary_percent: float = 1.0
    """Fraction of the head dim rotated (partial rotary)."""
    rope_scaling: dict[str, Any] | None = None
    """None or {"type": linear|dynamic|yarn, "factor": ..., "original_max_position_embeddings",
    "beta_fast", "beta_slow", "attention_factor"} (HF `rope_scaling` keys)."""
    attention_chunk_size: int | None = None
    """Llama-4 chunked-local attention length c (chunked layers only)."""
    chunked_attn_skip_freq: list[int] | None = None
    """Per layer, 1 = chunked-local attention; None with attention_chunk_size = every RoPE layer."""
    attn_temperature_tuning: bool = False
    """Llama-4 query temperature on NoPE layers."""
    attn_temperature_floor_scale: int = 8192
    """Llama-4 `floor_scale`."""
    attn_temperature_scale: float = 0.1
    """Llama-4 `attn_scale` (a temperature coefficient, not the softmax scale)."""
    coca_form: str = "slack"
    """CoCA: slack (released code) or strict (paper Eq. 9)."""
    dca: Any = None
    """DCA sizes, passed unchanged to the method: the run config's `attention.dca` section (or
    any object with `chunk_size` M, `local_size` W and `original_max_position_embeddings` L_o,
    e.g. `megatron_ext.ops.DCAParams`); chunk length C = M - W."""
    mask_documents: bool = True
    """Packed rows never attend across documents."""

    def __post_init__(self) -> None:
        super().__post_init__()  # expands an int no_rope_freq to a list, checks upstream fields
        n = self.num_layers
        if self.attention_variant not in VARIANTS:
            raise ValueError(f"attention_variant={self.attention_variant!r}; expected one of "
                             f"{', '.join(VARIANTS)}")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent={self.rotary_percent}; expected (0, 1]")
        rotary_dim = int(self.kv_channels * self.rotary_percent)
        if rotary_dim % 2:
            raise ValueError(f"rotary dim {rotary_dim} (kv_channels={self.kv_channels} x "
                             f"rotary_percent={self.rotary_percent}) must be even")
        self.window_attn_skip_freq = _per_layer(self.window_attn_skip_freq, n,
                                                "window_attn_skip_freq")
        if isinstance(self.window_attn_skip_freq, list) and self.window_size is None:
            raise ValueError("window_attn_skip_freq is set but window_size is None")
        if self.window_size is not None:
            left, right = self.window_size
            if right != 0 or left < 0:
                raise ValueError(f"window_size={self.window_size}; only causal sliding windows "
                                 "(W - 1, 0) with W >= 1 are supported")
        self.chunked_attn_skip_freq = _per_layer(self.chunked_attn_skip_freq, n,
                                                 "chunked_attn_skip_freq")
        if self.chunked_attn_skip_freq is not None and self.attention_chunk_size is None:
            raise ValueError("chunked_attn_skip_freq is set but attention_chunk_size is None")
        if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
            raise ValueError(f"attention_chunk_size={self.attention_chunk_size}; expected >= 1")
        if self.coca_form not in ("slack", "strict"):
            raise ValueError(f"coca_form={self.coca_form!r}; expected 'slack' or 'strict'")
        if self.rope_scaling is not None:
            self.rope_scaling_ops()  # validates
        v = self.attention_variant
        if v == "dca":
            if self.dca is None:
                raise ValueError("attention_variant='dca' needs dca (chunk_size, local_size)")
            DCAParams(self.dca.chunk_size, self.dca.local_size,
                      self.dca.original_max_position_embeddings,
                      getattr(self.dca, "scaling_factor", 1.0),
                      getattr(self.dca, "extension_factor", None))  # validates
            if getattr(self.dca, "scaling_factor", 1.0) != 1.0 and self.rope_scaling is not None:
                raise ValueError("dca.scaling_factor (linear scaling of the chunk-local positions) "
                                 f"and rope_scaling={self.rope_scaling}: use one of them")
        if v == "coca" and self.rotary_percent != 1.0 and self.coca_form == "strict":
            raise ValueError(f"strict CoCA rotates the whole head; rotary_percent="
                             f"{self.rotary_percent} (partial rotary: coca_form='slack')")
        if v in ("dca", "coca", "nope") and self.qk_l2_norm:
            raise ValueError(f"attention_variant={v!r} with qk_l2_norm=True: the Llama-4 L2 "
                             "QK-norm applies after RoPE and is only implemented for rope / "
                             "hybrid layers")
        if v in ("dca", "coca") and (self.window_size or self.attention_chunk_size):
            raise ValueError(f"attention_variant={v!r} cannot be combined with window_size or "
                             "attention_chunk_size")
        mixed = self.window_size is not None or self.attention_chunk_size is not None
        if v in ("rope", "nope") and (mixed or self.no_rope_freq):
            raise ValueError(f"attention_variant={v!r} with per-layer window / chunk / NoPE "
                             "patterns: use attention_variant='hybrid'")
        if v == "coca" and self.no_rope_freq:
            raise ValueError("CoCA needs RoPE on every layer; no_rope_freq must be unset")
        for i in range(1, n + 1):
            self.layer_attention(i)  # every layer resolves, or raises naming it

    @property
    def dca_chunk_size(self) -> int | None:
        """DCA M (read-only view of `dca`)."""
        return None if self.dca is None else self.dca.chunk_size

    @property
    def dca_local_size(self) -> int | None:
        """DCA W (read-only view of `dca`)."""
        return None if self.dca is None else self.dca.local_size

    @property
    def dca_original_max_position_embeddings(self) -> int | None:
        """DCA L_o (read-only view of `dca`)."""
        return None if self.dca is None else self.dca.original_max_position_embeddings

    def rope_scaling_ops(self) -> RopeScaling | None:
        """The ops-level RopeScaling for `rope_scaling` (None when unset)."""
        if self.rope_scaling is None:
            return None
        rs = dict(self.rope_scaling)
        kind = rs.pop("type", rs.pop("rope_type", None))
        try:
            return RopeScaling(kind=kind, **rs)
        except TypeError as e:
            raise ValueError(f"rope_scaling={self.rope_scaling}: {e}") from e

    def layer_attention(self, layer_number: int) -> LayerAttention:
        """Resolve layer `layer_number` (1-based, as Megatron numbers layers)."""
        i = layer_number - 1
        nope = self.attention_variant == "nope" or bool(
            self.no_rope_freq and self.no_rope_freq[i])
        window = None
        if self.window_size is not None and (self.window_attn_skip_freq is None
                                             or self.window_attn_skip_freq[i]):
            window = self.window_size[0] + 1
        chunk = None
        if self.attention_chunk_size is not None:
            on = (self.chunked_attn_skip_freq[i] if self.chunked_attn_skip_freq is not None
                  else not nope)
            chunk = self.attention_chunk_size if on else None
        if window is not None and chunk is not None:
            raise ValueError(f"layer {layer_number}: both a sliding window and chunked "
                             "attention are enabled; choose one per layer")
        temperature = None
        if self.attn_temperature_tuning and nope:
            temperature = (self.attn_temperature_floor_scale, self.attn_temperature_scale)
        return LayerAttention(rope=not nope, window=window, chunk=chunk,
                              temperature=temperature, qk_l2_norm=self.qk_l2_norm and not nope)


__all__ = ["ExtTransformerConfig", "LayerAttention", "VARIANTS"]
