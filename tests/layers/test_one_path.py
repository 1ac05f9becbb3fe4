"""One attention path: for each method, the Megatron layer = the public op = a reference.

The core-attention module a GPTModel builds (``ExtCoreAttention``, ``DualChunkCoreAttention``,
``CoCACoreAttention``; it builds its method object once and runs it) is fed q, k, v in
Megatron's [S, B, heads, D] layout with a ``SequenceInfo``; the public op of the same method
(``rope_attn_func``, ``dual_chunk_attn_func``, ``coca_attn_func``) is called with the same explicit
positions and document ids; a dense reference written from the method's definition
(``reference_model``: RoPE + ``attention_ref``, ``dca_attention_at``, ``coca_attention_at``) gives
the expected output. Forward and backward (dq, dk, dv from one random cotangent) must agree.

The batch is packed on purpose: row 0 holds a document continued from an earlier sample
(positions 37..56) and a new one (0..12); row 1 one document of 33 (five DCA chunks of 7). GQA
(4 query heads, 2 KV heads), D = 16. fp64, so the bar is 1e-10: the three differ only in
summation order. Dynamic-NTK cases use L = 57 > L0 = 16, so the length rule matters.
"""

from __future__ import annotations

import pytest
import torch
from reference_model import chunk_doc_ids, coca_attention_at, dca_attention_at

from megatron_ext.config import load_config
from megatron_ext.layers.core_attention import SequenceInfo
from megatron_ext.ops import (
    DCAParams,
    Rope,
    RopeScaling,
    apply_rope,
    attention_ref,
    coca_attn_func,
    dual_chunk_attn_func,
    rope_attn_func,
)
from megatron_ext.ops.qk_norm import l2_norm_post_rope
from megatron_ext.ops.rope import llama4_attn_temperature
from megatron_ext.specs import build_gpt_model

F64 = torch.float64
B, S, H, HKV, D = 2, 33, 4, 2, 16
TOL = 1e-10
TINY = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2"]
NTK = ["attention.rope_scaling={type: dynamic, factor: 2.0, original_max_position_embeddings: 16}"]
DCA = "attention.dca={chunk_size: 10, local_size: 3, original_max_position_embeddings: 8}"
NTK_OPS = RopeScaling("dynamic", 2.0, original_max_position_embeddings=16)


def _batch():
    positions = torch.stack([torch.cat([torch.arange(37, 57), torch.arange(13)]), torch.arange(33)])
    doc_ids = torch.stack([torch.tensor([5] * 20 + [6] * 13), torch.zeros(33, dtype=torch.long)])
    return positions, doc_ids


def _rope_ref(q, k, v, pos, doc, *, layer: int, cfg, scaling=None):
    """RoPE / NoPE layer by its definition: rotate, normalise or scale, then masked softmax."""
    hy = cfg.attention.hybrid
    kind = "rope_full" if hy is None else hy.resolve(cfg.model.num_layers)[layer - 1]
    L = int(pos.max()) + 1
    if kind.startswith("rope"):
        q, k = (apply_rope(x, pos, scaling=scaling, seq_len=L) for x in (q, k))
        if cfg.attention.qk_norm == "l2_post_rope":
            q, k = l2_norm_post_rope(q, 1e-5), l2_norm_post_rope(k, 1e-5)
    elif hy is not None and hy.use_temperature:
        q = q * llama4_attn_temperature(pos, hy.floor_scale, hy.attn_scale, dtype=F64)[..., None,
                                                                                        None]
    window = hy.window if kind == "rope_swa" else None
    docs = chunk_doc_ids(pos, doc, hy.chunk) if kind == "rope_chunked" else doc
    return attention_ref(q, k, v, window=window, doc_ids=docs)[0]


def _rope_op(q, k, v, pos, doc, *, layer: int, cfg, scaling=None):
    hy = cfg.attention.hybrid
    kind = "rope_full" if hy is None else hy.resolve(cfg.model.num_layers)[layer - 1]
    rope = Rope(scaling=scaling) if kind.startswith("rope") else None
    return rope_attn_func(
        q, k, v, q_positions=pos, k_positions=pos, q_doc_ids=doc, k_doc_ids=doc, rope=rope,
        window=hy.window if kind == "rope_swa" else None,
        chunk=hy.chunk if kind == "rope_chunked" else None,
        temperature=(hy.floor_scale, hy.attn_scale) if rope is None and hy and hy.use_temperature
        else None,
        qk_l2_norm_eps=1e-5 if rope and cfg.attention.qk_norm == "l2_post_rope" else None,
    )  # fmt: skip


def _dca_op(q, k, v, pos, doc, *, layer: int, cfg, scaling=None):
    d = cfg.attention.dca
    return dual_chunk_attn_func(
        q, k, v, chunk_size=d.chunk_size, local_size=d.local_size, q_positions=pos,
        k_positions=pos, q_doc_ids=doc, k_doc_ids=doc, rope_scaling=scaling,
        original_max_position_embeddings=d.original_max_position_embeddings,
    )  # fmt: skip


def _dca_ref(q, k, v, pos, doc, *, layer: int, cfg, scaling=None):
    d = cfg.attention.dca
    return dca_attention_at(
        q, k, v, pos, doc, chunk_size=d.chunk_size, local_size=d.local_size, theta=10000.0,
        original_max_position_embeddings=d.original_max_position_embeddings, scaling=scaling,
    )  # fmt: skip


def _coca_op(q, t, v, pos, doc, *, layer: int, cfg, scaling=None):
    return coca_attn_func(q, t, v, q_positions=pos, k_positions=pos, q_doc_ids=doc,
                          k_doc_ids=doc, form=cfg.attention.coca_form, rope_scaling=scaling)


def _coca_ref(q, t, v, pos, doc, *, layer: int, cfg, scaling=None):
    return coca_attention_at(q, t, v, pos, doc, form=cfg.attention.coca_form, theta=10000.0,
                             scaling=scaling)


CASES = [  # id, overrides, layer number, op, reference, ops-level scaling
    ("rope", ["attention.variant=rope"], 1, _rope_op, _rope_ref, None),
    ("rope-ntk", ["attention.variant=rope", *NTK], 1, _rope_op, _rope_ref, NTK_OPS),
    ("swa", ["attention.variant=hybrid", "attention.hybrid={preset: cohere2, window: 5}"], 1,
     _rope_op, _rope_ref, None),
    ("nope", ["attention.variant=hybrid", "attention.hybrid={preset: cohere2, window: 5}"], 4,
     _rope_op, _rope_ref, None),
    ("chunked-l2", ["attention.variant=hybrid", "attention.qk_norm=l2_post_rope",
                    "attention.hybrid={preset: llama4, chunk: 6, floor_scale: 4}"], 2,
     _rope_op, _rope_ref, None),
    ("nope-temperature", ["attention.variant=hybrid",
                          "attention.hybrid={preset: llama4, chunk: 6, floor_scale: 4}"], 4,
     _rope_op, _rope_ref, None),
    ("dca", ["attention.variant=dca", DCA], 1, _dca_op, _dca_ref, None),
    ("dca-ntk", ["attention.variant=dca", DCA, *NTK], 1, _dca_op, _dca_ref, NTK_OPS),
    ("coca-slack", ["attention.variant=coca"], 1, _coca_op, _coca_ref, None),
    ("coca-strict", ["attention.variant=coca", "attention.coca_form=strict"], 1, _coca_op,
     _coca_ref, None),
    ("coca-ntk", ["attention.variant=coca", *NTK], 1, _coca_op, _coca_ref, NTK_OPS),
]


def _grads(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_layer_equals_op_equals_reference(megatron_single_process, case) -> None:
    name, overrides, layer, op, ref, scaling = case
    cfg = load_config(None, [*TINY, *overrides])
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=64)
    core = model.decoder.layers[layer - 1].self_attention.core_attention
    pos, doc = _batch()
    q = torch.randn(B, S, H, D, dtype=F64)
    k, v = (torch.randn(B, S, HKV, D, dtype=F64) for _ in range(2))
    dout = torch.randn(B, S, H, D, dtype=F64)

    def via_layer(q, k, v):
        info = SequenceInfo(positions=pos, doc_ids=doc)
        out = core(*(x.transpose(0, 1) for x in (q, k, v)), None, packed_seq_params=info)
        return out.reshape(S, B, H, D).transpose(0, 1)

    kw = {"layer": layer, "cfg": cfg, "scaling": scaling}
    got_layer = _grads(via_layer, q, k, v, dout)
    got_op = _grads(lambda q, k, v: op(q, k, v, pos, doc, **kw), q, k, v, dout)
    want = _grads(lambda q, k, v: ref(q, k, v, pos, doc, **kw), q, k, v, dout)
    for what, got in (("layer", got_layer), ("op", got_op)):
        for n, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            err = (a - b).abs().max().item()
            assert err <= TOL, f"{name}: {what} {n} differs from the reference by {err:.2e}"
    assert (got_layer[0] - got_op[0]).abs().max().item() <= TOL


def test_layer_runs_the_method_it_built(megatron_single_process) -> None:
    """The method object is built once per layer (not per call) and is what forward runs."""
    cfg = load_config(None, [*TINY, "attention.variant=dca", DCA])
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=64)
    core = model.decoder.layers[0].self_attention.core_attention
    assert core.method.dca is cfg.attention.dca  # the typed section reaches the op unchanged
    assert DCAParams(10, 3, 8) == DCAParams(core.method.dca.chunk_size, core.method.dca.local_size,
                                            core.method.dca.original_max_position_embeddings)
    calls = []
    real = core.method.local_block
    core.method.local_block = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    pos, doc = _batch()
    x = torch.randn(S, B, H, D, dtype=F64)
    kv = torch.randn(S, B, HKV, D, dtype=F64)
    core(x, kv, kv, None, packed_seq_params=SequenceInfo(positions=pos, doc_ids=doc))
    assert calls == [1]


def test_layer_refusals(megatron_single_process) -> None:
    from megatron.core.transformer.enums import AttnMaskType

    cfg = load_config(None, [*TINY, "attention.variant=rope"])
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=64)
    core = model.decoder.layers[0].self_attention.core_attention
    x = torch.randn(S, B, H, D)
    kv = torch.randn(S, B, HKV, D)
    with pytest.raises(TypeError, match="pass a megatron_ext SequenceInfo as packed_seq_params"):
        core(x, kv, kv, torch.ones(B, 1, S, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask_type=AttnMaskType.no_mask"):
        core(x, kv, kv, None, attn_mask_type=AttnMaskType.no_mask)
    from megatron.core.packed_seq_params import PackedSeqParams

    with pytest.raises(TypeError, match="not thd packing"):
        core(x, kv, kv, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("rope", "coca-slack")],
                         ids=lambda c: c[0])
def test_layer_on_sdpa_equals_reference(megatron_single_process, case) -> None:
    """A layer's self-attention needs no lse, so plain causal rows may run on PyTorch's SDPA
    (chosen on CUDA; forced here on CPU, where SDPA is its CPU twin): one document per row."""
    from megatron_ext.ops import force_backend

    name, overrides, layer, _, ref, scaling = case
    cfg = load_config(None, [*TINY, *overrides])
    core = build_gpt_model(cfg.model, cfg.attention, vocab_size=64).decoder.layers[0]
    core = core.self_attention.core_attention
    pos, doc = torch.arange(S).expand(B, S), torch.zeros(B, S, dtype=torch.long)
    q = torch.randn(B, S, H, D, dtype=F64)
    k, v = (torch.randn(B, S, HKV, D, dtype=F64) for _ in range(2))
    dout = torch.randn(B, S, H, D, dtype=F64)

    def via_layer(q, k, v):
        out = core(*(x.transpose(0, 1) for x in (q, k, v)), None,
                   packed_seq_params=SequenceInfo(positions=pos))
        return out.reshape(S, B, H, D).transpose(0, 1)

    with force_backend("sdpa"):
        got = _grads(via_layer, q, k, v, dout)
    want = _grads(lambda q, k, v: ref(q, k, v, pos, doc, layer=1, cfg=cfg, scaling=scaling),
                  q, k, v, dout)
    for n, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a - b).abs().max().item() <= TOL, (name, n)
