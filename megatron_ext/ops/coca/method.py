"""``CoCAAttention``: CoCA as a method object (prologue + block), shared by every caller.

The owner of a token turns its query into Q' and its ``t_proj`` output into K' at the token's
own position (``coca_query_prologue`` / ``coca_key_prologue``); after that CoCA is ordinary
masked attention on (Q', K', v). So context parallelism ships K' instead of K, a KV cache
stores K', and the layer, the public op and the benchmarks all run this one object.
"""

from __future__ import annotations

import torch

from megatron_ext.ops.coca.prologue import COCA_FORMS, coca_key_prologue, coca_query_prologue
from megatron_ext.ops.meta import Meta
from megatron_ext.ops.method import AttentionMethod
from megatron_ext.ops.rope import RopeScaling

__all__ = ["CoCAAttention"]


class CoCAAttention(AttentionMethod):
    """Collinear constrained attention.

    Args:
        form: "slack" (the released code) or "strict" (paper Eq. 9).
        theta: RoPE base.
        scaling: optional RoPE scaling (dynamic NTK uses the batch's length rule).
        rotary_dim: None or the head dim, or fewer dims for GPT-NeoX-style partial rotary
            (slack form only).
        causal: causal mask.
        softmax_scale: default 1/sqrt(D).
    """

    name = "coca"

    def __init__(
        self,
        *,
        form: str = "slack",
        theta: float = 10000.0,
        scaling: RopeScaling | None = None,
        rotary_dim: int | None = None,
        causal: bool = True,
        softmax_scale: float | None = None,
    ) -> None:
        if form not in COCA_FORMS:
            raise ValueError(f"form={form!r}; expected one of {COCA_FORMS}")
        self.form, self.theta, self.scaling, self.rotary_dim = form, theta, scaling, rotary_dim
        self.causal, self.softmax_scale = bool(causal), softmax_scale
        if not self.causal:
            self.refusal = "every query sees every key of its document"

    def _rope(self, rope_len: int) -> dict:
        return {"form": self.form, "theta": self.theta, "scaling": self.scaling,
                "rotary_dim": self.rotary_dim, "seq_len": rope_len}

    def prepare_q(self, q: torch.Tensor, meta: Meta, rope_len: int) -> torch.Tensor:
        pos = meta.positions.clamp(min=0).to(q.device)
        return coca_query_prologue(q, pos, **self._rope(rope_len))

    def prepare_kv(
        self, t: torch.Tensor, v: torch.Tensor, meta: Meta, rope_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos = meta.positions.clamp(min=0).to(t.device)
        return coca_key_prologue(t, pos, **self._rope(rope_len)), v
