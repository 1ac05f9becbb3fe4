"""Continued pretraining: which changes between a checkpoint and the new run are valid.

`train.init_from` loads only the weights of a checkpoint; the new run may train at another
sequence length with another attention method or positional setting. What may change:

- `data.seq_length`, `model.max_position_embeddings` and dropout;
- RoPE base (`attention.rope_theta`), `attention.rope_scaling` (linear, dynamic NTK, YaRN),
  `attention.rotary_percent`;
- the method among rope / nope / hybrid / dca / coca: DCA, hybrid and CoCA only change how
  positions enter the attention scores, with the same projections. CoCA's `t_proj` has the
  shape of `k_proj` and sits in the same slice of the fused QKV weight, so a RoPE model's keys
  become CoCA's t (as the CoCA paper continues a RoPE model).

What is refused, with the reason:

- any model shape (layers, width, heads, KV groups, MLP, norm, activation, biases, tied
  embeddings, vocabulary) or `attention.qk_norm` (different parameters or a different
  meaning of q.k);
- leaving CoCA for another method: CoCA's t projection is not a key projection;
- another tokenizer: the same ids would mean other tokens.
"""

from __future__ import annotations

from megatron_ext.config import ConfigError, RunConfig

_FREE_MODEL_FIELDS = ("max_position_embeddings", "hidden_dropout", "attention_dropout")


def check_switch(saved: RunConfig, new: RunConfig, source: str) -> list[str]:
    """Refuse an invalid switch from `saved` (the checkpoint's config) to `new`.

    Returns:
        Notes describing what changes (printed before training).

    Raises:
        ConfigError: naming every refused difference and why.
    """
    problems, notes = [], []
    for name in type(new.model).__dataclass_fields__:
        if name in _FREE_MODEL_FIELDS:
            continue
        a, b = getattr(saved.model, name), getattr(new.model, name)
        if a != b:
            problems.append(f"model.{name}: checkpoint {a!r}, this run {b!r} (the weights "
                            "have another shape or meaning)")
    sa, na = saved.attention, new.attention
    if sa.qk_norm != na.qk_norm:
        problems.append(f"attention.qk_norm: checkpoint {sa.qk_norm!r}, this run {na.qk_norm!r} "
                        "(adds or removes q/k norm weights, or changes what q.k means)")
    if sa.variant == "coca" and na.variant != "coca":
        problems.append(f"attention.variant: checkpoint 'coca', this run {na.variant!r} (CoCA's "
                        "t projection is not a key projection; continue it as 'coca')")
    if saved.data.tokenizer != new.data.tokenizer:
        problems.append(f"data.tokenizer: checkpoint {saved.data.tokenizer!r}, this run "
                        f"{new.data.tokenizer!r} (the same ids would mean other tokens)")
    if problems:
        raise ConfigError(f"train.init_from={source!r} cannot continue into this config: "
                          + "; ".join(problems))
    if sa.variant != na.variant:
        notes.append(f"attention {sa.variant} -> {na.variant}")
    for key in ("rope_theta", "rope_scaling", "rotary_percent", "dca", "hybrid", "coca_form"):
        if getattr(sa, key) != getattr(na, key) and (key != "coca_form" or na.variant == "coca"):
            notes.append(f"attention.{key}: {getattr(sa, key)!r} -> {getattr(na, key)!r}")
    if saved.data.seq_length != new.data.seq_length:
        ratio = new.data.seq_length / saved.data.seq_length
        notes.append(f"data.seq_length {saved.data.seq_length} -> {new.data.seq_length} "
                     f"({ratio:g}x)")
    return notes


__all__ = ["check_switch"]
