"""Run configuration: one typed dataclass per concern, strict YAML, `--set` overrides.

A run is described by one YAML file with the sections `model`, `attention`, `parallel`,
`train`, `data`, `deepspeed` and `inference`. Loading is strict (unknown keys, wrong types and
invalid values raise `ConfigError`, a `ValueError`, naming the key, the value and what would be
valid). `--set section.key=value` overrides are parsed as YAML scalars and then checked against
the field's type exactly like file values. The resolved config dumps back to YAML and reloads to
an equal object; train.py saves it beside every checkpoint.

Each component receives only its own section; the run config is unpacked once, in train.py.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from megatron_ext.typed_yaml import ConfigError, field_type, from_dict, set_path, to_dict

LayerType = Literal["rope_full", "rope_swa", "rope_chunked", "nope_full"]


def _positive(section: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name}={value!r}; expected a positive number")


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the GPT model (Megatron-core `TransformerConfig` fields where they exist)."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """KV heads (GQA); None means one per query head (MHA)."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4 x hidden_size."""
    vocab_size: int | None = None
    """Vocabulary; None takes the tokenizer's size."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is configured for (HF `max_position_embeddings`)."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    """Norm type."""
    activation: Literal["gelu", "swiglu"] = "swiglu"
    """MLP activation."""
    add_bias_linear: bool = False
    """Biases in linear layers."""
    add_qkv_bias: bool = False
    """Biases on the q, k, v projections only (Qwen2; Megatron `add_qkv_bias`)."""
    parallel_block: bool = False
    """Cohere-style layer: one input LayerNorm (no bias) whose output feeds attention and MLP,
    both summed into the residual (megatron_ext.layers.parallel_block)."""
    logit_scale: float = 1.0
    """HF Cohere `logit_scale`: logits = scale * h W^T (applied by the final norm of the
    megatron_ext.layers.parallel_block spec)."""
    tie_embeddings: bool = True
    """Share input embedding and output projection."""
    init_method_std: float = 0.02
    """Std of the normal initialisation."""
    layernorm_epsilon: float = 1e-5
    """Norm epsilon."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    def __post_init__(self) -> None:
        _positive(
            "model",
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            init_method_std=self.init_method_std,
            layernorm_epsilon=self.layernorm_epsilon,
            logit_scale=self.logit_scale,
        )
        if self.parallel_block and self.normalization != "LayerNorm":
            raise ConfigError(f"model.parallel_block=True needs model.normalization='LayerNorm' "
                              f"(the Cohere block), got {self.normalization!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{name}={p!r}; expected 0 <= p < 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True)
class RopeScalingConfig:
    """RoPE frequency scaling (HF `rope_scaling`); see docs/methods/rope.md."""

    type: Literal["linear", "dynamic", "yarn", "llama3"]
    """Scaling kind."""
    factor: float
    """Scale factor (>= 1)."""
    original_max_position_embeddings: int | None = None
    """Pretraining length L0 (dynamic NTK and YaRN); None falls back to the model's."""
    beta_fast: float = 32.0
    """YaRN high-frequency boundary."""
    beta_slow: float = 1.0
    """YaRN low-frequency boundary."""
    attention_factor: float | None = None
    """YaRN attention factor override (logits scale by its square)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above L0 / low_freq_factor are interpolated by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below L0 / high_freq_factor are kept."""

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ConfigError(f"rope_scaling.factor={self.factor!r}; expected >= 1")
        _positive("rope_scaling", 
                  original_max_position_embeddings=self.original_max_position_embeddings)


@dataclass(kw_only=True)
class DCAConfig:
    """Dual Chunk Attention (ChunkLlama / Qwen2.5-1M naming); chunk length C = M - W."""

    chunk_size: int
    """M: the largest position index DCA uses (ChunkLlama: 3/4 of the pretraining length)."""
    local_size: int
    """W: local window kept exact in the successive-chunk pass (ChunkLlama: 1/8 of it)."""
    original_max_position_embeddings: int | None = None
    """L_o for the Qwen temperature max(1, 0.1 ln(L/L_o) + 1); None disables it."""
    scaling_factor: float = 1.0
    """ChunkLlama position interpolation: every chunk-local position (query copies and the keys'
    j mod C) is divided by this before the rotation; 1 = off."""
    extension_factor: float | None = None
    """ChunkLlama `scale`: cos and sin are multiplied by mscale = 1 + 0.05 ln(factor) when the
    factor is > 1 (q and k each carry it, so rotated logits x mscale^2); None = off."""

    def __post_init__(self) -> None:
        if not 0 <= self.local_size < self.chunk_size:
            raise ConfigError(
                f"attention.dca: local_size={self.local_size}, chunk_size={self.chunk_size}; "
                "expected 0 <= local_size < chunk_size"
            )
        _positive("attention.dca",
                  original_max_position_embeddings=self.original_max_position_embeddings,
                  scaling_factor=self.scaling_factor, extension_factor=self.extension_factor)


@dataclass(kw_only=True)
class HybridConfig:
    """Per-layer RoPE/NoPE pattern. Either `preset` with `nope_every`, or explicit `layer_types`."""

    preset: Literal["cohere2", "llama4", "smollm3", "custom"] = "cohere2"
    """cohere2: RoPE+SWA with every Nth layer NoPE full; llama4: RoPE chunked-local with every
    Nth layer NoPE full + temperature tuning; smollm3: RoPE full with every Nth layer NoPE;
    custom: use `layer_types`."""
    nope_every: int = 4
    """N: layer i (0-based) is NoPE when (i + 1) % N == 0."""
    layer_types: list[LayerType] | None = None
    """Explicit per-layer list (preset 'custom'), e.g. [rope_swa, rope_swa, rope_swa, nope_full]."""
    window: int | None = None
    """Sliding window W for rope_swa layers (HF `sliding_window`; Megatron window_size (W-1, 0))."""
    chunk: int | None = None
    """Chunk length for rope_chunked layers (Llama-4 `attention_chunk_size`)."""
    temperature_tuning: bool | None = None
    """Llama-4 query temperature on NoPE layers; None = on for llama4, off otherwise."""
    floor_scale: int = 8192
    """Llama-4 temperature floor_scale."""
    attn_scale: float = 0.1
    """Llama-4 temperature coefficient (not the softmax scale)."""

    def __post_init__(self) -> None:
        _positive("attention.hybrid", nope_every=self.nope_every, window=self.window,
                  chunk=self.chunk, floor_scale=self.floor_scale)
        if self.preset == "custom" and not self.layer_types:
            raise ConfigError("attention.hybrid.preset='custom' needs attention.hybrid.layer_types")
        if self.preset != "custom" and self.layer_types is not None:
            raise ConfigError(
                f"attention.hybrid.layer_types is only used with preset 'custom' "
                f"(preset={self.preset!r})"
            )

    def resolve(self, num_layers: int) -> list[LayerType]:
        """Per-layer types for a model of `num_layers` layers."""
        if self.preset == "custom":
            assert self.layer_types is not None
            if len(self.layer_types) != num_layers:
                raise ConfigError(
                    f"attention.hybrid.layer_types has {len(self.layer_types)} entries; "
                    f"model.num_layers={num_layers}"
                )
            types_ = list(self.layer_types)
        else:
            local: LayerType = {"cohere2": "rope_swa", "llama4": "rope_chunked",
                                "smollm3": "rope_full"}[self.preset]  # type: ignore[assignment]
            types_ = ["nope_full" if (i + 1) % self.nope_every == 0 else local
                      for i in range(num_layers)]
        if "rope_swa" in types_ and self.window is None:
            raise ConfigError("attention.hybrid: rope_swa layers need attention.hybrid.window")
        if "rope_chunked" in types_ and self.chunk is None:
            raise ConfigError("attention.hybrid: rope_chunked layers need attention.hybrid.chunk")
        return types_  # type: ignore[return-value]

    @property
    def use_temperature(self) -> bool:
        if self.temperature_tuning is None:
            return self.preset == "llama4"
        return self.temperature_tuning


@dataclass(kw_only=True)
class LongHeadsConfig:
    """LongHeads inference-time chunk retrieval (per head)."""

    chunk_len: int = 256
    """w: tokens per chunk."""
    num_chunks: int = 16
    """K: chunks each head attends (includes the first, previous and own chunk)."""

    def __post_init__(self) -> None:
        _positive("attention.longheads", chunk_len=self.chunk_len)
        if self.num_chunks < 3:
            raise ConfigError(
                f"attention.longheads.num_chunks={self.num_chunks}; expected >= 3 "
                "(chunks 0, a-1 and a are always selected)"
            )


@dataclass(kw_only=True)
class AttentionConfig:
    """Which attention the model uses and its method parameters."""

    variant: Literal["rope", "nope", "hybrid", "coca", "dca", "longheads"] = "rope"
    """rope/nope: plain causal; hybrid: per-layer RoPE/NoPE pattern; coca: collinear constrained;
    dca: dual chunk attention; longheads: chunk retrieval (inference only)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rotary_percent: float = 1.0
    """Fraction of the head dim that is rotated."""
    rope_scaling: RopeScalingConfig | None = None
    """Optional RoPE frequency scaling."""
    qk_norm: Literal["none", "layernorm_pre_rope", "l2_post_rope"] = "none"
    """Per-head normalisation of q and k."""
    mask_documents: bool = True
    """Packed rows: forbid attention across document boundaries."""
    coca_form: Literal["slack", "strict"] = "slack"
    """CoCA form: slack (the released code) or strict (paper Eq. 9)."""
    dca: DCAConfig | None = None
    """Dual chunk attention parameters (variant 'dca')."""
    hybrid: HybridConfig | None = None
    """Layer pattern (variant 'hybrid')."""
    longheads: LongHeadsConfig = field(default_factory=LongHeadsConfig)
    """LongHeads parameters (variant 'longheads')."""

    def __post_init__(self) -> None:
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"attention.rotary_percent={self.rotary_percent!r}; expected (0, 1]")
        _positive("attention", rope_theta=self.rope_theta)
        if self.variant == "dca" and self.dca is None:
            raise ConfigError("attention.variant='dca' needs an attention.dca section "
                              "(chunk_size, local_size)")
        if self.variant == "hybrid" and self.hybrid is None:
            raise ConfigError("attention.variant='hybrid' needs an attention.hybrid section")
        knobs = self.dca is not None and (self.dca.scaling_factor != 1.0
                                          or (self.dca.extension_factor or 0) > 1)
        if knobs and self.rope_scaling:
            raise ConfigError(
                f"attention.dca.scaling_factor={self.dca.scaling_factor} with "
                f"attention.rope_scaling.type={self.rope_scaling.type!r}: the chunk-local "
                "position interpolation is itself a linear RoPE scaling; use one of them")
        if self.variant == "coca" and self.rotary_percent != 1.0 and self.coca_form == "strict":
            raise ConfigError(f"attention.variant='coca' with coca_form='strict' rotates the full "
                              f"head dim; rotary_percent={self.rotary_percent} must be 1.0 "
                              "(partial rotary follows the GPT-NeoX release: coca_form='slack')")


@dataclass(kw_only=True)
class ParallelConfig:
    """How ranks are arranged: tensor x context x data parallel."""

    tensor_parallel_size: int = 1
    """Tensor-parallel ranks."""
    context_parallel_size: int = 1
    """Ranks that share one sequence."""
    cp_algorithm: Literal["ring", "allgather", "a2a"] = "ring"
    """Context-parallel communication pattern."""
    cp_layout: Literal["zigzag", "contiguous"] = "zigzag"
    """How a sequence is split across context-parallel ranks."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl on CUDA, gloo on CPU."""

    def __post_init__(self) -> None:
        _positive("parallel", tensor_parallel_size=self.tensor_parallel_size,
                  context_parallel_size=self.context_parallel_size)


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and bookkeeping."""

    seed: int = 1234
    """Seed for initialisation and data order."""
    steps: int = 20
    """Optimizer steps."""
    micro_batch_size: int = 2
    """Sequences per rank per micro-step."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype."""
    log_interval: int = 1
    """Steps between log lines."""
    eval_interval: int = 0
    """Steps between held-out evaluations (0: only at the end)."""
    eval_batches: int = 2
    """Batches per evaluation."""
    save_interval: int = 0
    """Steps between checkpoints (0: only at the end; a checkpoint is always saved at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in out_dir/checkpoints (0 keeps all)."""
    out_dir: str = "runs/tiny"
    """Checkpoints, resolved config, tensorboard logs and plots."""
    init_from: str | None = None
    """Continued pretraining: load only the weights of this checkpoint (a run directory or one
    of its checkpoints/step_N) before step 0; optimizer, schedule and data start fresh."""
    loss_chunk_size: int = 4096
    """Tokens per cross-entropy chunk: logits of at most this many tokens exist at once
    (0: the model's own loss over full [S, vocab] logits)."""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """Recompute in backward: 'full' each transformer layer, 'selective' the core attention."""
    seq_warmup_start: int | None = None
    """Sequence-length warm-up: first length (None: off); grows linearly to data.seq_length."""
    seq_warmup_steps: int = 0
    """Steps of the sequence-length warm-up."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for the MFU estimate (None: a table of known GPUs; unknown
    devices show no MFU)."""

    def __post_init__(self) -> None:
        _positive("train", steps=self.steps, micro_batch_size=self.micro_batch_size,
                  grad_accum_steps=self.grad_accum_steps, lr=self.lr,
                  log_interval=self.log_interval, eval_batches=self.eval_batches,
                  seq_warmup_start=self.seq_warmup_start, peak_tflops=self.peak_tflops)
        if self.seq_warmup_start is not None and not self.seq_warmup_steps:
            raise ConfigError(f"train.seq_warmup_start={self.seq_warmup_start} needs "
                              "train.seq_warmup_steps > 0")
        for name in ("warmup_steps", "eval_interval", "save_interval", "weight_decay",
                     "grad_clip", "keep_checkpoints", "loss_chunk_size", "seq_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}; expected >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio!r}; expected [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}; expected [0, 1)")


@dataclass(kw_only=True)
class BlendSource:
    """One weighted corpus of a blend (`data.blend`)."""

    path: str
    """Same forms as `data.corpus`: 'embedded', a file, a directory or an indexed-dataset prefix."""
    weight: float = 1.0
    """Relative share of training samples (normalised over the blend)."""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"data.blend weight={self.weight!r} for {self.path!r}; "
                              "expected a positive number")


@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from and how they are packed (docs/data.md)."""

    corpus: str = "embedded"
    """'embedded' (the shipped corpus), a .txt / .jsonl[.gz|.xz] / .parquet file, a directory
    of them, or a Megatron indexed dataset (PREFIX of PREFIX.bin + PREFIX.idx)."""
    blend: list[BlendSource] = field(default_factory=list)
    """Weighted corpora for training; replaces `corpus` (leave that at 'embedded')."""
    text_field: str = "text"
    """Field (JSON Lines) or column (Parquet) that holds a document's text."""
    tokenizer: str | None = None
    """A tokenizer.json or a Hugging Face tokenizer directory; None = the shipped BPE-4096."""
    eos_token: str | None = None
    """End-of-document token; None = the tokenizer's own (its config, or its one special
    token)."""
    cache_dir: str = "~/.cache/megatron_ext/tokens"
    """Where tokenised corpora are kept, keyed by corpus and tokenizer."""
    seq_length: int = 128
    """Tokens per packed training sequence."""
    max_documents: int | None = None
    """Use only the first N training documents of each corpus (quick runs)."""
    eval_split: Literal["dev", "test"] = "dev"
    """Held-out split of the embedded corpus used for evaluation during training."""
    eval_corpus: str | None = None
    """Held-out corpus (any `corpus` form; 'embedded' means its `eval_split` books); None =
    `eval_split` for the embedded corpus, else `eval_fraction` of each corpus's documents."""
    eval_fraction: float = 0.01
    """Share of whole documents held out from a non-embedded corpus when `eval_corpus` is None
    (at least one document)."""

    def __post_init__(self) -> None:
        _positive("data", seq_length=self.seq_length, max_documents=self.max_documents)
        if self.blend and self.corpus != "embedded":
            raise ConfigError(f"data.corpus={self.corpus!r} and data.blend are both set; "
                              "a blend replaces the corpus: list it in data.blend instead")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction!r}; expected 0 < f < 1")
        for name in ("corpus", "text_field", "cache_dir"):
            if not getattr(self, name):
                raise ConfigError(f"data.{name} is empty")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """DeepSpeed engine options; the DeepSpeed JSON is generated from these."""

    enabled: bool = False
    """Wrap the model in a DeepSpeed engine."""
    zero_stage: int = 0
    """ZeRO stage 0-3."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO optimizer-state offload."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce / all-gather bucket (ZeRO 1-3)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (ZeRO 1-3)."""
    initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the loss scale doubles."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage!r}; expected 0, 1, 2 or 3")
        _positive("deepspeed", reduce_bucket_size=self.reduce_bucket_size,
                  loss_scale_window=self.loss_scale_window)
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ConfigError(f"deepspeed.offload_optimizer={self.offload_optimizer!r} needs "
                              "deepspeed.zero_stage >= 1")


@dataclass(kw_only=True)
class InferenceConfig:
    """Generation with a KV cache."""

    max_new_tokens: int = 32
    """Tokens to generate."""
    prefill_chunk_size: int = 4096
    """Prompt tokens per prefill step (chunked prefill)."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this probability (1 = off)."""
    max_seq_len: int = 262144
    """Longest prompt + new tokens accepted; longer requests are refused with an error."""
    seed: int = 0
    """Seed of the sampling generator."""

    def __post_init__(self) -> None:
        _positive("inference", max_new_tokens=self.max_new_tokens,
                  prefill_chunk_size=self.prefill_chunk_size, max_seq_len=self.max_seq_len)
        if self.temperature < 0 or self.top_k < 0:
            raise ConfigError(f"inference: temperature={self.temperature!r}, top_k={self.top_k!r};"
                              " expected both >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"inference.top_p={self.top_p!r}; expected (0, 1] (1 = off)")


@dataclass(kw_only=True)
class RunConfig:
    """Everything one run needs; the only object train.py unpacks."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        tp = p.tensor_parallel_size
        if m.num_attention_heads % tp:
            raise ConfigError(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"parallel.tensor_parallel_size={tp}"
            )
        groups = m.num_query_groups or m.num_attention_heads
        if groups % tp:
            raise ConfigError(
                f"model.num_query_groups={groups} is not divisible by "
                f"parallel.tensor_parallel_size={tp}"
            )
        if self.attention.variant == "hybrid":
            assert self.attention.hybrid is not None
            self.attention.hybrid.resolve(m.num_layers)
        needs_even = self.attention.variant in ("coca", "dca", "rope", "hybrid", "longheads")
        if needs_even and m.head_dim % 2:
            raise ConfigError(f"head dim {m.head_dim} (hidden_size/num_attention_heads) "
                              "must be even for RoPE")


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'section.key=value' into the dotted key and the YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if "." not in key:
        raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. train.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from e
    return key, value


def config_from_dict(data: dict[str, Any], overrides: Iterable[str] = ()) -> RunConfig:
    """Build a RunConfig from plain data plus `section.key=value` overrides."""
    data = dict(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _, parts = field_type(RunConfig, key)
        set_path(data, parts, value)
    return from_dict(RunConfig, data)


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a run YAML strictly and apply `section.key=value` overrides.

    Args:
        path: YAML file, or None for all defaults.
        overrides: strings like "train.lr=3e-4" or "attention.dca.chunk_size=6144".

    Raises:
        ConfigError (a ValueError): unknown key, wrong type or invalid value, naming all three.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {os.fspath(path)!r}: top level must be a mapping of "
                              f"sections, got {type(loaded).__name__}")
        data = loaded
    return config_from_dict(data, overrides)


def dump_config(cfg: RunConfig, path: str | os.PathLike | None = None) -> str:
    """YAML text of the resolved config (written atomically to `path` if given)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return text


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config FILE and repeatable --set section.key=value."""
    parser.add_argument("--config", default=None, help="run YAML (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> RunConfig:
    return load_config(args.config, [*args.overrides, *extra])


__all__ = [
    "AttentionConfig", "BlendSource", "ConfigError", "DCAConfig", "DataConfig", "DeepSpeedConfig",
    "HybridConfig", "InferenceConfig", "LongHeadsConfig", "ModelConfig", "ParallelConfig",
    "RopeScalingConfig", "RunConfig", "TrainConfig", "add_config_args", "config_from_args",
    "config_from_dict", "dump_config", "load_config", "parse_override",
]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m megatron_ext.config [--config RUN.yaml] [--set k=v ...]`: print the resolved
    config, or the error that would stop a run."""
    parser = argparse.ArgumentParser(description="Validate a run config and print it resolved.")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        print(dump_config(config_from_args(args)), end="")
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
    main()
