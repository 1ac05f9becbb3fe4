"""Hugging Face modelling code for models exported from megatron_ext (load with
`trust_remote_code=True`): CoCA, Dual Chunk Attention and per-layer hybrid RoPE / NoPE /
sliding-window / chunked-local / temperature-tuned attention, optional parallel (Cohere) block.

Self-contained (torch + transformers). Attention is computed densely from its definition, in
fp32, on the whole sequence (no KV cache: `generate` runs with `use_cache=False`), so it is a
reference implementation for checking and light use, not a fast one. The maths of every method
is documented with megatron_ext (docs/conversion.md and docs/methods/).

RoPE is rotate-half: dim i pairs with i + r/2; dims >= r pass unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_megatron_ext import MegatronExtConfig
except ImportError:  # loaded as a plain module
    from configuration_megatron_ext import MegatronExtConfig


def _inv_freq(dim: int, theta: float, scaling: dict | None, seq_len: int):
    idx = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32)
    inv = 1.0 / (theta ** (idx / dim))
    if not scaling:
        return inv, 1.0
    kind, s = scaling["type"], float(scaling["factor"])
    l0 = scaling.get("original_max_position_embeddings")
    if kind == "linear":
        return inv / s, float(scaling.get("attention_factor") or 1.0)
    if kind == "dynamic":
        if seq_len > l0:
            base = theta * (s * seq_len / l0 - (s - 1)) ** (dim / (dim - 2))
            inv = 1.0 / (base ** (idx / dim))
        return inv, 1.0

    def corr(n):
        return dim * math.log(l0 / (n * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = math.floor(corr(scaling["beta_fast"])), math.ceil(corr(scaling["beta_slow"]))
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp
    inv = (inv / s) * (1 - keep) + inv * keep
    a = scaling.get("attention_factor")
    if a is None:
        a = 1.0 if s <= 1 else 0.1 * math.log(s) + 1.0
    return inv, float(a)


def _cos_sin(pos: torch.Tensor, dim: int, theta: float, scaling: dict | None, seq_len: int):
    """cos, sin [*pos.shape, dim] (angles fp32 = position x inverse frequency)."""
    inv, a = _inv_freq(dim, theta, scaling, seq_len)
    ang = pos.to(torch.float32)[..., None] * inv
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos() * a, ang.sin() * a


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., S, D]; cos/sin [S, r] (or broadcastable); rotate the first r dims."""
    r = cos.shape[-1]
    xr, rest = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rot = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * cos + rot * sin, rest), dim=-1)


class MegatronExtAttention(nn.Module):
    def __init__(self, config: MegatronExtConfig, layer_idx: int) -> None:
        super().__init__()
        m, a = config.megatron_ext_model, config.megatron_ext_attention
        self.kind = config.megatron_ext_layer_types[layer_idx]
        self.variant = a["variant"]
        self.a = a
        self.H = m["num_attention_heads"]
        self.G = m.get("num_query_groups") or self.H
        self.D = m["hidden_size"] // self.H
        self.r = int(self.D * a.get("rotary_percent", 1.0))
        self.eps = m.get("layernorm_epsilon", 1e-5)
        hid, bias = m["hidden_size"], bool(m.get("add_qkv_bias"))
        self.q_proj = nn.Linear(hid, self.H * self.D, bias=bias)
        key = nn.Linear(hid, self.G * self.D, bias=bias)
        if self.variant == "coca":
            self.t_proj = key
        else:
            self.k_proj = key
        self.v_proj = nn.Linear(hid, self.G * self.D, bias=bias)
        self.o_proj = nn.Linear(self.H * self.D, hid, bias=False)
        hy = a.get("hybrid") or {}
        self.window = hy.get("window") if self.kind.endswith("_swa") else None
        self.chunk = hy.get("chunk") if self.kind.endswith("_chunked") else None
        temp = hy.get("temperature_tuning")
        if temp is None:
            temp = hy.get("preset") == "llama4"
        self.temperature = (hy.get("floor_scale", 8192), hy.get("attn_scale", 0.1)) \
            if (temp and self.kind.startswith("nope")) else None

    def _mask(self, S: int, device) -> torch.Tensor:
        i = torch.arange(S, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        ok = j <= i
        if self.window is not None:
            ok &= i - j < self.window
        if self.chunk is not None:
            ok &= (i // self.chunk) == (j // self.chunk)
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.H, self.D).transpose(1, 2).float()
        key = self.t_proj(x) if self.variant == "coca" else self.k_proj(x)
        k = key.view(B, S, self.G, self.D).transpose(1, 2).float()
        v = self.v_proj(x).view(B, S, self.G, self.D).transpose(1, 2).float()
        rep = self.H // self.G
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        pos = torch.arange(S, device=x.device)
        theta, scaling = self.a.get("rope_theta", 10000.0), self.a.get("rope_scaling")
        scale = 1.0 / math.sqrt(self.D)
        rope = self.kind.startswith("rope")
        if self.variant == "dca" and rope:
            scores = self._dca_scores(q, k, pos, S) * scale
        elif self.variant == "coca":
            cos, sin = _cos_sin(pos, self.r, theta, scaling, S)
            scores = self._coca_scores(q, k, cos, sin) * scale
        else:
            if rope:
                cos, sin = _cos_sin(pos, self.r, theta, scaling, S)
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
                if self.a.get("qk_norm") == "l2_post_rope":
                    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + self.eps)
                    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + self.eps)
            elif self.temperature is not None:
                floor, coef = self.temperature
                t = 1.0 + coef * torch.log1p(torch.floor((pos.double() + 1.0) / floor))
                q = q * t.float()[:, None]
            scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~self._mask(S, x.device), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        out = out.transpose(1, 2).reshape(B, S, self.H * self.D).to(x.dtype)
        return self.o_proj(out)

    def _dca_scores(self, q, k, pos, S):
        d = self.a["dca"]
        M, W = d["chunk_size"], d["local_size"]
        C = M - W
        theta, scaling = self.a.get("rope_theta", 10000.0), self.a.get("rope_scaling")

        def rot(x, p):
            cos, sin = _cos_sin(p, self.r, theta, scaling, S)
            return _rope(x, cos, sin)

        kr = rot(k, pos % C)
        q_intra = rot(q, pos % C)
        q_succ = rot(q, torch.clamp(C + pos % C, max=M))
        q_inter = rot(q, torch.full_like(pos, min(2 * C - 1, M)))
        delta = (pos[:, None] // C) - (pos[None, :] // C)
        s = torch.where(delta == 0, q_intra @ kr.transpose(-1, -2),
                        torch.where(delta == 1, q_succ @ kr.transpose(-1, -2),
                                    q_inter @ kr.transpose(-1, -2)))
        lo = d.get("original_max_position_embeddings")
        if lo:
            t = max(1.0, 0.1 * math.log(S / lo) + 1.0)
            s = s * t * t
        return s

    def _coca_scores(self, q, t, cos, sin):
        D = self.D
        tau = torch.relu((t[..., : D // 2] + t[..., D // 2:]) / 2)
        if self.a.get("coca_form", "slack") == "strict":
            qq = q[..., : D // 2] ** 2 + q[..., D // 2:] ** 2
            zero = torch.zeros_like(qq)
            q2 = _rope(torch.cat((qq, zero), -1), cos, sin)
            k2 = _rope(torch.cat((tau, torch.zeros_like(tau)), -1), cos, sin)
            return q2 @ k2.transpose(-1, -2)
        qp = q * _rope(q, cos, sin)
        kp = _rope(torch.cat((tau, tau), -1), cos, sin)
        return qp @ kp.transpose(-1, -2)


class MegatronExtMLP(nn.Module):
    def __init__(self, config: MegatronExtConfig) -> None:
        super().__init__()
        m = config.megatron_ext_model
        hid, ffn = m["hidden_size"], m.get("ffn_hidden_size") or 4 * m["hidden_size"]
        self.gate_proj = nn.Linear(hid, ffn, bias=False)
        self.up_proj = nn.Linear(hid, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hid, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(config: MegatronExtConfig):
    m = config.megatron_ext_model
    eps = m.get("layernorm_epsilon", 1e-5)
    if m.get("normalization", "RMSNorm") == "LayerNorm":
        return nn.LayerNorm(m["hidden_size"], eps=eps, bias=False)
    return nn.RMSNorm(m["hidden_size"], eps=eps)


class MegatronExtDecoderLayer(nn.Module):
    def __init__(self, config: MegatronExtConfig, layer_idx: int) -> None:
        super().__init__()
        self.parallel = bool(config.megatron_ext_model.get("parallel_block"))
        self.input_layernorm = _norm(config)
        self.self_attn = MegatronExtAttention(config, layer_idx)
        self.mlp = MegatronExtMLP(config)
        if not self.parallel:
            self.post_attention_layernorm = _norm(config)

    def forward(self, x):
        h = self.input_layernorm(x)
        if self.parallel:
            return x + self.self_attn(h) + self.mlp(h)
        x = x + self.self_attn(h)
        return x + self.mlp(self.post_attention_layernorm(x))


class MegatronExtPreTrainedModel(PreTrainedModel):
    config_class = MegatronExtConfig
    base_model_prefix = "model"
    _no_split_modules = ["MegatronExtDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.megatron_ext_model.get("init_method_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


class MegatronExtModel(MegatronExtPreTrainedModel):
    def __init__(self, config: MegatronExtConfig) -> None:
        super().__init__(config)
        m = config.megatron_ext_model
        self.embed_tokens = nn.Embedding(config.vocab_size, m["hidden_size"])
        self.layers = nn.ModuleList(MegatronExtDecoderLayer(config, i)
                                    for i in range(m["num_layers"]))
        self.norm = _norm(config)
        self.post_init()

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class MegatronExtForCausalLM(MegatronExtPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MegatronExtConfig) -> None:
        super().__init__(config)
        self.model = MegatronExtModel(config)
        self.lm_head = nn.Linear(config.megatron_ext_model["hidden_size"], config.vocab_size,
                                 bias=False)
        self.logit_scale = float(config.megatron_ext_model.get("logit_scale", 1.0))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids)) * self.logit_scale
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
