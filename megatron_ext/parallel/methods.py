"""Per-method context-parallel definitions: accepted keyword arguments, owner-side prologues,
the block function every plan calls, and the plans that can honour the method's mask.

../shared/METHODS.md §6 per method:

- plain (global causal or full, RoPE applied by the caller or NoPE): every earlier key matters,
  so ring, all-gather or all-to-all;
- window (sliding window W) and chunked (chunked-local c): keys come from a bounded
  neighbourhood, so the halo plan (and "local" when nothing crosses a shard) besides the
  generic ones;
- dca: keys are rotated by their owner at ``j mod C`` before any communication; queries keep
  their un-rotated values and build the intra / successive / inter copies locally from absolute
  positions inside ``dual_chunk_block``;
- coca: the owner computes ``K' = RoPE(concat(tau, tau))`` (what travels instead of K) and
  ``Q'`` stays local; the block is then plain masked attention on (Q', K', v).

A block function maps (q, k, v, query metadata, key metadata) to a mergeable fp32 (out, lse).
Metadata (``Meta``) holds per-token positions (-1 = padding), document numbers and document
lengths, [B, n] int64 on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from megatron_ext.ops import block_attention
from megatron_ext.ops.coca import COCA_FORMS, coca_key_prologue, coca_query_prologue
from megatron_ext.ops.dual_chunk import dca_rotate_keys, dca_temperature, dual_chunk_block
from megatron_ext.parallel.sharding import CPLayout

__all__ = ["ATTNS", "Meta", "Method", "cat_meta", "layout_meta", "make_method"]

ATTNS = ("plain", "window", "chunked", "dca", "coca")
GENERIC_PLANS = ("ring", "allgather", "a2a")
_HALF = (torch.float16, torch.bfloat16)


class Meta(NamedTuple):
    """Per-token metadata of a block: int64 CPU tensors [B, n]."""

    positions: torch.Tensor
    """Per-document position; -1 for padding."""
    doc_ids: torch.Tensor
    """Document number within the row."""
    lengths: torch.Tensor
    """Length of the token's document (0 for padding)."""


def layout_meta(layout: CPLayout, rank: int, batch: int) -> Meta:
    """Metadata of rank ``rank``'s shard, expanded to ``batch`` rows."""
    rows = lambda x: x[rank].expand(batch, -1) if x.shape[1] == 1 else x[rank]  # noqa: E731
    if layout.index.shape[1] not in (1, batch):
        raise ValueError(f"layout has {layout.index.shape[1]} rows; q has batch {batch}")
    return Meta(rows(layout.positions), rows(layout.doc_ids), rows(layout.doc_lengths))


def cat_meta(metas: list[Meta]) -> Meta:
    """Metadata of blocks concatenated along the sequence, in list order."""
    return Meta(*(torch.cat(parts, 1) for parts in zip(*metas)))


BlockFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Meta, Meta], tuple[torch.Tensor, torch.Tensor]
]


@dataclass
class Method:
    """One attention variant under context parallelism."""

    name: str
    kwargs: dict
    plans: tuple[str, ...]
    """Plans that honour the mask."""
    default_plan: str
    refusal: str
    """Why the other plans cannot honour the mask (for the error message)."""
    window: int | None = None
    chunk: int | None = None
    prologue: Callable = field(default=lambda q, k, v, meta, layout: (q, k, v))
    """(q, k, v, local Meta, CPLayout) -> (q', k', v'), run by each owner before communication."""
    block: BlockFn | None = None


_ACCEPTED = {
    "plain": {"causal": True, "softmax_scale": None},
    "window": {"window": None, "causal": True, "softmax_scale": None},
    "chunked": {"chunk": None, "causal": True, "softmax_scale": None},
    "dca": {
        "chunk_size": None, "local_size": None, "theta": 10000.0, "softmax_scale": None,
        "original_max_position_embeddings": None, "seq_len": None,
    },
    "coca": {
        "form": "slack", "theta": 10000.0, "causal": True, "softmax_scale": None,
        "rope_scaling": None, "rotary_dim": None,
    },
}  # fmt: skip
_REQUIRED = {"window": ("window",), "chunked": ("chunk",), "dca": ("chunk_size", "local_size")}


def _masked_block(causal: bool, window: int | None, chunk: int | None, scale) -> BlockFn:
    def block(q, k, v, qm: Meta, km: Meta):
        return block_attention(
            q, k, v, q_positions=qm.positions, k_positions=km.positions, q_doc_ids=qm.doc_ids,
            k_doc_ids=km.doc_ids, causal=causal, window=window, chunk=chunk, softmax_scale=scale,
        )  # fmt: skip

    return block


def _dca_block(kw: dict) -> BlockFn:
    def block(q, k, v, qm: Meta, km: Meta):
        if q.dtype in _HALF:  # partials are merged in fp32
            q, k, v = q.float(), k.float(), v.float()
        # Padding never meets a real token: its own document ids (-2 queries, -1 keys).
        q_doc = torch.where(qm.positions >= 0, qm.doc_ids, -2)
        k_doc = torch.where(km.positions >= 0, km.doc_ids, -1)
        temp = None
        if kw["original_max_position_embeddings"]:
            length = (
                qm.lengths if kw["seq_len"] is None else torch.full_like(qm.lengths, kw["seq_len"])
            )
            temp = dca_temperature(length, kw["original_max_position_embeddings"]).to(q.device)
        return dual_chunk_block(
            q, k, v, q_positions=qm.positions.clamp(min=0).to(q.device),
            k_positions=km.positions.clamp(min=0).to(q.device), chunk_size=kw["chunk_size"],
            local_size=kw["local_size"], theta=kw["theta"], softmax_scale=kw["softmax_scale"],
            q_doc_ids=q_doc.to(q.device), k_doc_ids=k_doc.to(q.device), temperature=temp,
        )  # fmt: skip

    return block


def _dca_prologue(kw: dict):
    def prologue(q, k, v, meta: Meta, layout: CPLayout):
        pos = meta.positions.clamp(min=0).to(k.device)
        k_rot = dca_rotate_keys(
            k, pos, chunk_size=kw["chunk_size"], local_size=kw["local_size"], theta=kw["theta"]
        )
        return q, k_rot, v

    return prologue


def _coca_prologue(kw: dict):
    def prologue(q, t, v, meta: Meta, layout: CPLayout):
        scaling = kw["rope_scaling"]
        seq_len = None
        if scaling is not None and scaling.kind == "dynamic":  # L over the whole batch, as one
            seq_len = int(layout.positions.max()) + 1  # process computes it over all positions
        rope = {
            "form": kw["form"], "theta": kw["theta"], "scaling": scaling,
            "rotary_dim": kw["rotary_dim"], "seq_len": seq_len,
        }  # fmt: skip
        pos = meta.positions.clamp(min=0).to(q.device)
        return coca_query_prologue(q, pos, **rope), coca_key_prologue(t, pos, **rope), v

    return prologue


def make_method(attn: str, kwargs: dict) -> Method:
    """Validate ``attn`` and its keyword arguments and build its Method."""
    if attn not in ATTNS:
        raise ValueError(f"attn={attn!r}; expected one of {ATTNS}")
    accepted = _ACCEPTED[attn]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"attn={attn!r} got unexpected keyword arguments {unknown}; accepted: "
            f"{sorted(accepted)}"
        )
    kw = {**accepted, **kwargs}
    missing = [name for name in _REQUIRED.get(attn, ()) if kw[name] is None]
    if missing:
        raise ValueError(f"attn={attn!r} needs {missing}")
    for name in ("window", "chunk"):
        val = kw.get(name)
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"{name}={val!r}; expected an int >= 1")
    if attn in ("window", "chunked") and kw["causal"] is not True:
        raise ValueError(f"attn={attn!r} with causal={kw['causal']!r}; the mask is causal")
    if attn == "coca" and kw["form"] not in COCA_FORMS:
        raise ValueError(f"form={kw['form']!r}; expected one of {COCA_FORMS}")
    scale = kw["softmax_scale"]
    if attn == "window":
        return Method(
            attn, kw, ("halo", "local", *GENERIC_PLANS), "halo", "", window=kw["window"],
            block=_masked_block(True, kw["window"], None, scale),
        )  # fmt: skip
    if attn == "chunked":
        return Method(
            attn, kw, ("halo", "local", *GENERIC_PLANS), "halo", "", chunk=kw["chunk"],
            block=_masked_block(True, None, kw["chunk"], scale),
        )  # fmt: skip
    why = {
        "plain": "every query sees every earlier key of its document",
        "dca": "a DCA query sees every earlier key of its document (inter pass)",
        "coca": "every query sees every earlier key of its document",
    }[attn]
    if attn == "dca":
        return Method(
            attn, kw, GENERIC_PLANS, "ring", why, prologue=_dca_prologue(kw), block=_dca_block(kw)
        )
    causal = bool(kw["causal"])
    block = _masked_block(causal, None, None, scale)
    if attn == "coca":
        return Method(
            attn, kw, GENERIC_PLANS, "ring", why, prologue=_coca_prologue(kw), block=block
        )
    return Method(attn, kw, GENERIC_PLANS, "ring", why, block=block)
