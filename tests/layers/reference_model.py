"""A plain-torch GPT that recomputes a megatron_ext GPTModel from its state dict (tests only).

`ReferenceGPT(model_cfg, attn_cfg, state_dict)` copies the Megatron weights into leaf tensors
keyed by the Megatron parameter names, so gradients map back one to one. Its forward is written
from the definitions, not from Megatron's modules:

- word embedding lookup; per layer: input norm -> fused QKV split by Megatron's per-query-group
  row layout ``[q of the group's n_rep heads, k, v]`` -> optional pre-RoPE head norm (Megatron
  ``qk_layernorm``) -> attention -> output projection -> residual -> pre-MLP norm -> MLP
  (SwiGLU: ``linear_fc1`` rows are ``[gate; up]``, ``silu(gate) * up``) -> residual;
  final norm; output layer tied to the embedding (or ``output_layer.weight``).
- attention per layer from the run config's `attention` section (see ``layer_plans``): RoPE /
  NoPE / sliding window / chunked-local through ``attention_ref``; the Llama-4 query temperature
  on NoPE layers; the Llama-4 L2 norm after RoPE; CoCA and DCA as dense N x N constructions at
  explicit positions (``coca_attention_at``, ``dca_attention_at``).

Positions are the absolute per-document positions of the batch (a document continued from an
earlier sample starts at e.g. 37). The ops' own references (``coca_attn_ref``,
``dual_chunk_attn_ref``) derive positions from ``doc_ids`` and so always start documents at 0;
the explicit-position versions here are checked against them where both apply
(test_layers.py::test_explicit_position_refs_match_ops_refs). Maths: docs/methods/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_ext.config import AttentionConfig, ModelConfig
from megatron_ext.ops import apply_rope, attention_ref
from megatron_ext.ops.documents import document_runs
from megatron_ext.ops.dual_chunk import dca_position_rule
from megatron_ext.ops.qk_norm import head_layer_norm, l2_norm_post_rope
from megatron_ext.ops.rope import RopeScaling, llama4_attn_temperature, rope_cos_sin

__all__ = [
    "LayerPlan",
    "ReferenceGPT",
    "chunk_doc_ids",
    "coca_attention_at",
    "dca_attention_at",
    "layer_plans",
    "qkv_row_index",
]


@dataclass(frozen=True)
class LayerPlan:
    """What one layer's attention does, read from the run config (not from Megatron)."""

    attention: str  # rope | nope | coca | dca
    window: int | None = None
    chunk: int | None = None
    temperature: tuple[int, float] | None = None  # Llama-4 (floor_scale, attn_scale)
    l2_post_rope: bool = False


def layer_plans(model_cfg: ModelConfig, attn_cfg: AttentionConfig) -> list[LayerPlan]:
    """Per-layer attention of the model described by the `model` and `attention` sections."""
    n, v = model_cfg.num_layers, attn_cfg.variant
    l2 = attn_cfg.qk_norm == "l2_post_rope"
    if v in ("coca", "dca", "nope"):
        return [LayerPlan(v)] * n
    if v == "rope":
        return [LayerPlan("rope", l2_post_rope=l2)] * n
    if v != "hybrid":
        raise ValueError(f"attention.variant={v!r}; the reference model has no such layer")
    hy = attn_cfg.hybrid
    assert hy is not None
    temp = (hy.floor_scale, hy.attn_scale) if hy.use_temperature else None
    by_type = {
        "rope_full": LayerPlan("rope", l2_post_rope=l2),
        "rope_swa": LayerPlan("rope", window=hy.window, l2_post_rope=l2),
        "rope_chunked": LayerPlan("rope", chunk=hy.chunk, l2_post_rope=l2),
        "nope_full": LayerPlan("nope", temperature=temp),
    }
    return [by_type[t] for t in hy.resolve(n)]


def qkv_row_index(num_heads: int, num_groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Rows of Megatron's fused ``linear_qkv`` weight that hold q, k and v.

    Megatron stores, for each query group g, the rows of its n_rep = H / G query heads, then its
    key head, then its value head: ``[q_{g n_rep} .. q_{g n_rep + n_rep - 1}, k_g, v_g]``.

    Returns:
        (q_rows [H * D], k_rows [G * D], v_rows [G * D]) int64, in head-major order.
    """
    rep = num_heads // num_groups
    block = (rep + 2) * head_dim
    d = torch.arange(head_dim)
    q = [g * block + r * head_dim + d for g in range(num_groups) for r in range(rep)]
    k = [g * block + rep * head_dim + d for g in range(num_groups)]
    v = [g * block + (rep + 1) * head_dim + d for g in range(num_groups)]
    return torch.cat(q), torch.cat(k), torch.cat(v)


def chunk_doc_ids(positions: torch.Tensor, doc_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Document ids whose runs are the Llama-4 attention chunks (docs/methods/hybrid.md).

    Chunked-local attention is causal attention inside one (document, position // chunk) pair,
    with the absolute per-document positions, so each distinct pair becomes its own document.

    Args:
        positions, doc_ids: int [B, S].

    Returns:
        int64 [B, S] ids for ``attention_ref(doc_ids=...)``.
    """
    run, _ = document_runs(doc_ids)
    pairs = torch.stack((run, positions // chunk), dim=-1).reshape(-1, 2)
    return pairs.unique(dim=0, return_inverse=True)[1].reshape(doc_ids.shape)


def _visible(positions: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, S, S]: key j visible to query i (same document run, j <= i)."""
    run, _ = document_runs(doc_ids)
    S = positions.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=positions.device).tril()
    return causal & (run[:, :, None] == run[:, None, :])


def _softmax_out(z: torch.Tensor, visible: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Masked softmax of logits z [B, H, S, S] applied to v [B, S, H, D] -> [B, S, H, D].

    Every query sees at least itself, so no row is empty.
    """
    p = torch.softmax(z.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def coca_attention_at(
    q: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    doc_ids: torch.Tensor,
    *,
    form: str,
    theta: float,
    scaling: RopeScaling | None = None,
) -> torch.Tensor:
    """Dense CoCA (ops/coca/README.md) at explicit positions, causal within documents.

    Slack: ``s(m, n) = sum_d q_m[d] (R_n t_dup_n)[d] (R_m q_m)[d] / sqrt(D)`` (three-operand
    contraction); strict: ``sum_i tau_{n,i} |q_{m,i}|^2 cos((m - n) w_i) / sqrt(D)``, with
    ``tau = ReLU((t[:D/2] + t[D/2:]) / 2)`` and ``t_dup = [tau, tau]``.

    Args:
        q: [B, S, H, D]; t, v: [B, S, Hkv, D]; positions, doc_ids: int [B, S].

    Returns:
        [B, S, H, D].
    """
    B, S, H, D = q.shape
    rep = H // t.shape[2]
    t, v = t.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    tau = F.relu((t[..., : D // 2] + t[..., D // 2 :]) / 2)  # [B, S, H, D/2]
    seq_len = int(positions.max()) + 1 if scaling is not None else None
    if form == "strict":
        cos, sin = rope_cos_sin(
            positions, D, theta=theta, scaling=scaling, dtype=q.dtype, seq_len=seq_len
        )
        c, s = cos[..., : D // 2], sin[..., : D // 2]  # [B, S, D/2]
        cos_diff = c[:, :, None] * c[:, None] + s[:, :, None] * s[:, None]  # [B, Sq, Sk, D/2]
        energy = q[..., : D // 2] ** 2 + q[..., D // 2 :] ** 2  # [B, S, H, D/2]
        z = torch.einsum("bmhi,bnhi,bmni->bhmn", energy, tau, cos_diff)
    elif form == "slack":
        rope = {"theta": theta, "scaling": scaling, "seq_len": seq_len}
        q_rot = apply_rope(q, positions, **rope)
        t_rot = apply_rope(torch.cat((tau, tau), dim=-1), positions, **rope)
        z = torch.einsum("bmhd,bnhd,bmhd->bhmn", q, t_rot, q_rot)
    else:
        raise ValueError(f"form={form!r}; expected 'slack' or 'strict'")
    return _softmax_out(z / math.sqrt(D), _visible(positions, doc_ids), v)


def _document_length(positions: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Per token, 1 + the largest position of its document run in the row ([B, S])."""
    run, _ = document_runs(doc_ids)
    out = torch.zeros_like(positions)
    for b in range(positions.shape[0]):
        for r in run[b].unique():
            sel = run[b] == r
            out[b, sel] = positions[b, sel].max() + 1
    return out


def dca_attention_at(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    doc_ids: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    theta: float,
    original_max_position_embeddings: int | None = None,
    scaling: RopeScaling | None = None,
) -> torch.Tensor:
    """Dense DCA (ops/dual_chunk/README.md) at explicit positions, causal within documents.

    ``z_ij = T_i^2 <R_{pos_q(i, j)} q_i, R_{j mod C} k_j> / sqrt(D)`` with the intra / successive
    / inter rule for pos_q, and ``T_i = max(1, 0.1 ln(L_i / L_o) + 1)`` where L_i is the length of
    query i's document as the batch shows it (largest position + 1); T = 1 without L_o.

    RoPE ``scaling`` (dynamic NTK) uses L = the batch's largest position + 1.

    Args:
        q: [B, S, H, D]; k, v: [B, S, Hkv, D]; positions, doc_ids: int [B, S].

    Returns:
        [B, S, H, D].
    """
    B, S, H, D = q.shape
    rep = H // k.shape[2]
    pos_q, pos_k = dca_position_rule(
        positions, positions, chunk_size=chunk_size, local_size=local_size
    )  # [B, S, S], [B, S]
    rope = {"theta": theta, "scaling": scaling, "seq_len": int(positions.max()) + 1}
    k_rot = apply_rope(k, pos_k, **rope).repeat_interleave(rep, dim=2)
    z = torch.zeros(B, H, S, S, dtype=q.dtype)
    for p in pos_q.unique().tolist():  # every query rotation the rule uses, picked per pair
        q_rot = apply_rope(q, torch.full_like(positions, p), **rope)
        z = torch.where((pos_q == p)[:, None], torch.einsum("bihd,bjhd->bhij", q_rot, k_rot), z)
    temp = torch.ones(B, S, dtype=q.dtype)
    if original_max_position_embeddings:
        length = _document_length(positions, doc_ids).to(q.dtype)
        temp = (0.1 * torch.log(length / original_max_position_embeddings) + 1).clamp(min=1)
    z = z * (temp**2 / math.sqrt(D))[:, None, :, None]
    return _softmax_out(z, _visible(positions, doc_ids), v.repeat_interleave(rep, dim=2))


class ReferenceGPT:
    """Plain-torch GPT with weights copied from a Megatron GPTModel state dict.

    Args:
        model_cfg: the run config's `model` section.
        attn_cfg: its `attention` section.
        state_dict: the Megatron model's state dict (``_extra_state`` entries are skipped).

    Attributes:
        params: Megatron parameter name -> leaf tensor (requires_grad) holding a copy.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        attn_cfg: AttentionConfig,
        state_dict: Mapping[str, torch.Tensor],
    ) -> None:
        self.m, self.a = model_cfg, attn_cfg
        self.params = {
            name: t.detach().clone().requires_grad_(True)
            for name, t in state_dict.items()
            if not name.endswith("_extra_state")
        }
        self.plans = layer_plans(model_cfg, attn_cfg)
        H, D = model_cfg.num_attention_heads, model_cfg.head_dim
        self.groups = model_cfg.num_query_groups or H
        self.rows = qkv_row_index(H, self.groups, D)
        rs = attn_cfg.rope_scaling
        self.scaling = (
            None
            if rs is None
            else RopeScaling(
                kind=rs.type,
                factor=rs.factor,
                original_max_position_embeddings=rs.original_max_position_embeddings
                or model_cfg.max_position_embeddings,
                beta_fast=rs.beta_fast,
                beta_slow=rs.beta_slow,
                attention_factor=rs.attention_factor,
            )
        )

    def _p(self, name: str) -> torch.Tensor | None:
        return self.params.get(name)

    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w, b = self.params[f"{prefix}.weight"], self._p(f"{prefix}.bias")
        eps = self.m.layernorm_epsilon
        if self.m.normalization == "RMSNorm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + eps) * w + b

    def _head_norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """Per-head norm over D with the model's norm type (Megatron builds it that way)."""
        kind = "rmsnorm" if self.m.normalization == "RMSNorm" else "layernorm"
        return head_layer_norm(
            x,
            self.params[f"{prefix}.weight"],
            self._p(f"{prefix}.bias"),
            eps=self.m.layernorm_epsilon,
            kind=kind,
        )

    def _linear(self, x: torch.Tensor, prefix: str, rows: torch.Tensor | None = None):
        w, b = self.params[f"{prefix}.weight"], self._p(f"{prefix}.bias")
        if rows is not None:
            w, b = w[rows], None if b is None else b[rows]
        y = x @ w.T
        return y if b is None else y + b

    def _attention(self, plan: LayerPlan, q, k, v, positions, doc_ids) -> torch.Tensor:
        a = self.a
        rotary_dim = int(self.m.head_dim * a.rotary_percent)
        if plan.attention == "coca":
            return coca_attention_at(
                q,
                k,
                v,
                positions,
                doc_ids,
                form=a.coca_form,
                theta=a.rope_theta,
                scaling=self.scaling,
            )
        if plan.attention == "dca":
            assert a.dca is not None
            return dca_attention_at(
                q,
                k,
                v,
                positions,
                doc_ids,
                chunk_size=a.dca.chunk_size,
                local_size=a.dca.local_size,
                theta=a.rope_theta,
                original_max_position_embeddings=a.dca.original_max_position_embeddings,
            )
        if plan.attention == "rope":
            rope = {"theta": a.rope_theta, "rotary_dim": rotary_dim, "scaling": self.scaling}
            q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)
            if plan.l2_post_rope:
                q = l2_norm_post_rope(q, self.m.layernorm_epsilon)
                k = l2_norm_post_rope(k, self.m.layernorm_epsilon)
        elif plan.temperature is not None:
            floor_scale, attn_scale = plan.temperature
            q = q * llama4_attn_temperature(positions, floor_scale, attn_scale)[..., None, None]
        ids = doc_ids if plan.chunk is None else chunk_doc_ids(positions, doc_ids, plan.chunk)
        out, _ = attention_ref(q, k, v, causal=True, window=plan.window, doc_ids=ids)
        return out

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, S, V] for tokens, positions and doc_ids (all int [B, S])."""
        B, S = tokens.shape
        H, G, D = self.m.num_attention_heads, self.groups, self.m.head_dim
        emb = self.params["embedding.word_embeddings.weight"]
        x = emb[tokens]  # [B, S, hidden]
        for i, plan in enumerate(self.plans):
            pre = f"decoder.layers.{i}"
            h = self._norm(x, f"{pre}.input_layernorm")
            q, k, v = (
                self._linear(h, f"{pre}.self_attention.linear_qkv", rows) for rows in self.rows
            )
            q, k, v = q.view(B, S, H, D), k.view(B, S, G, D), v.view(B, S, G, D)
            if self.a.qk_norm == "layernorm_pre_rope":  # Megatron qk_layernorm, before RoPE
                q = self._head_norm(q, f"{pre}.self_attention.q_layernorm")
                k = self._head_norm(k, f"{pre}.self_attention.k_layernorm")
            o = self._attention(plan, q, k, v, positions, doc_ids).reshape(B, S, H * D)
            x = x + self._linear(o, f"{pre}.self_attention.linear_proj")
            h = self._norm(x, f"{pre}.pre_mlp_layernorm")
            up = self._linear(h, f"{pre}.mlp.linear_fc1")
            if self.m.activation == "swiglu":
                gate, lin = up.chunk(2, dim=-1)
                act = F.silu(gate) * lin
            else:
                act = F.gelu(up)
            x = x + self._linear(act, f"{pre}.mlp.linear_fc2")
        x = self._norm(x, "decoder.final_layernorm")
        out_w = emb if self.m.tie_embeddings else self.params["output_layer.weight"]
        return x @ out_w.T
