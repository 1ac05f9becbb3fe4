"""Declarative tensor map between megatron_ext GPTModel state dicts and HF causal-LM checkpoints.

Names on our side are those of `GPTModel.state_dict()` at tensor-parallel size 1 (global
shapes); a dist checkpoint stores the same tensors under layer-stacked keys, resolved by
`megatron_ext.convert.mcore_io`. Each rule names our tensor, the HF tensors it is made of and a
transform; the transforms are small and exactly invertible (concatenations and row
permutations), so HF -> ours -> HF is bit-exact:

- `copy`: one tensor, unchanged;
- `qkv`: Megatron's fused `linear_qkv` interleaves per KV group g the rows
  [q heads of g (H/G heads), k_g, v_g]; HF keeps q_proj, k_proj (CoCA: t_proj), v_proj apart;
- `gate_up`: `linear_fc1` = [gate_proj; up_proj] (SwiGLU silu(gate) * up);
- interleaved RoPE families (Llama-4, Cohere2): the output rows of q and k are permuted per
  head from interleaved pairs (2i, 2i+1) to rotate-half pairs (i, i + D/2) on import and back
  on export; q . k is unchanged since both move alike (docs/conversion.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ext.convert.errors import ConversionError
from megatron_ext.ops.rope import interleaved_to_rotate_half_perm

__all__ = ["Layout", "Rule", "from_hf_layer", "global_rules", "layer_rules", "to_hf_layer"]


@dataclass(frozen=True)
class Layout:
    """What the rules need to know about the model."""

    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int
    qkv_bias: bool = False
    qk_layernorm: bool = False
    parallel_block: bool = False
    final_norm_bias: bool = False
    tie_embeddings: bool = True
    interleaved: bool = False
    key_name: str = "k_proj"
    mlp_name: str = "mlp"
    rotary_dim: int | None = None


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the HF tensors it is made of."""

    ours: str
    hf: tuple[str, ...]
    kind: str = "copy"  # copy | qkv | gate_up


def layer_rules(lay: Layout) -> list[Rule]:
    """Rules of one decoder layer (names relative to the layer prefixes)."""
    k, m = lay.key_name, lay.mlp_name
    rules = [
        Rule("input_layernorm.weight", ("input_layernorm.weight",)),
        Rule("self_attention.linear_qkv.weight",
             ("self_attn.q_proj.weight", f"self_attn.{k}.weight", "self_attn.v_proj.weight"),
             "qkv"),
        Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        Rule("mlp.linear_fc1.weight", (f"{m}.gate_proj.weight", f"{m}.up_proj.weight"), "gate_up"),
        Rule("mlp.linear_fc2.weight", (f"{m}.down_proj.weight",)),
    ]
    if lay.qkv_bias:
        rules.append(Rule("self_attention.linear_qkv.bias",
                          ("self_attn.q_proj.bias", f"self_attn.{k}.bias",
                           "self_attn.v_proj.bias"), "qkv"))
    if not lay.parallel_block:
        rules.append(Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)))
    if lay.qk_layernorm:
        rules += [Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)),
                  Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",))]
    return rules


def global_rules(lay: Layout) -> list[Rule]:
    """Rules of the tensors outside the decoder layers."""
    rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
             Rule("decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not lay.tie_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",)))
    return rules


def _perm(lay: Layout, heads: int, t: torch.Tensor, *, inverse: bool) -> torch.Tensor:
    if not lay.interleaved:
        return t
    perm = interleaved_to_rotate_half_perm(lay.head_dim, rotary_dim=lay.rotary_dim)
    if inverse:
        perm = torch.argsort(perm)
    w = t.reshape(heads, lay.head_dim, *t.shape[1:])
    return w[:, perm].reshape(t.shape)


def _fuse_qkv(lay: Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    G, D = lay.num_groups, lay.head_dim
    per = lay.num_heads // G
    q = _perm(lay, lay.num_heads, q, inverse=False)
    k = _perm(lay, G, k, inverse=False)
    rest = q.shape[1:]
    parts = (q.reshape(G, per * D, *rest), k.reshape(G, D, *rest), v.reshape(G, D, *rest))
    return torch.cat(parts, dim=1).reshape(G * (per + 2) * D, *rest)


def _split_qkv(lay: Layout, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    G, D = lay.num_groups, lay.head_dim
    per = lay.num_heads // G
    rest = w.shape[1:]
    g = w.reshape(G, (per + 2) * D, *rest)
    q = g[:, : per * D].reshape(G * per * D, *rest)
    k = g[:, per * D: (per + 1) * D].reshape(G * D, *rest)
    v = g[:, (per + 1) * D:].reshape(G * D, *rest)
    return (_perm(lay, lay.num_heads, q, inverse=True).contiguous(),
            _perm(lay, G, k, inverse=True).contiguous(), v.contiguous())


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ConversionError(f"tensor {name}: shape {tuple(t.shape)}, expected {expected} "
                              "for this config")


def from_hf_layer(lay: Layout, rule: Rule, tensors: list[torch.Tensor],
                  names: list[str]) -> torch.Tensor:
    """Our tensor from the HF tensors of `rule` (full names in `names`, for errors)."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "gate_up":
        gate, up = tensors
        if gate.shape != up.shape:
            raise ConversionError(f"{names[0]} {tuple(gate.shape)} and {names[1]} "
                                  f"{tuple(up.shape)} differ in shape")
        return torch.cat((gate, up), dim=0)
    q, k, v = tensors
    H, G, D = lay.num_heads, lay.num_groups, lay.head_dim
    _check_shape(names[0], q, (H * D, *q.shape[1:]))
    _check_shape(names[1], k, (G * D, *q.shape[1:]))
    _check_shape(names[2], v, (G * D, *q.shape[1:]))
    return _fuse_qkv(lay, q, k, v)


def to_hf_layer(lay: Layout, rule: Rule, t: torch.Tensor) -> list[torch.Tensor]:
    """The HF tensors of `rule` from our tensor."""
    if rule.kind == "copy":
        return [t]
    if rule.kind == "gate_up":
        if t.shape[0] % 2:
            raise ConversionError(f"{rule.ours}: {t.shape[0]} rows cannot be split into "
                                  "gate and up halves")
        gate, up = t.chunk(2, dim=0)
        return [gate.contiguous(), up.contiguous()]
    return list(_split_qkv(lay, t))
