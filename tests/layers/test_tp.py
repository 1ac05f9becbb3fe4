"""Tensor parallelism of the Megatron layers: a TP=2 GPTModel equals the TP=1 one.

One spawned world of 2 gloo processes builds each variant (CoCA, DCA, hybrid RoPE-SWA/NoPE,
Llama-4 chunked/NoPE with temperature) at TP=1 and at TP=2 from the same seed
(`use_cpu_initialization=True` draws the same master weights) on a packed batch with a document
boundary: the per-token loss (vocab-parallel cross entropy), the logits, and one backward of the
logits against a fixed cotangent. Each rank writes its parameters, gradients, logits and
Megatron's partition attributes to disk. The tests here gather the TP=2 shards by an explicit
layout table (column- and vocab-parallel weights on dim 0, the fused QKV per query group,
SwiGLU's fc1 as two interleaved halves, row-parallel weights on dim 1, norms and row-parallel
biases replicated; QK-layernorm gradients summed over TP, as Megatron's finalize_model_grads
does) and compare with TP=1: weights bit-exactly, logits and every gradient to 1e-10.

The models run in fp64, so the only difference between TP=1 and TP=2 is the order of the sums
that TP splits (row-parallel all-reduce, vocab-parallel output): about 1e-15 relative, well
inside 1e-10, while any layout or communication error is O(1). The loss is compared to 1e-6:
megatron-core's vocab-parallel cross entropy computes in fp32 whatever the logits' dtype (that
is also why the backward starts from the logits, not from the loss).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from utils import run_distributed

from megatron_ext.config import config_from_dict
from megatron_ext.layers.forward import gpt_forward
from megatron_ext.specs import build_gpt_model

VOCAB, B, S, SPLIT = 128, 2, 24, 15

_BASE_MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "max_position_embeddings": 256,
}

VARIANTS: dict[str, dict] = {
    "coca": {"model": {}, "attention": {"variant": "coca"}},
    "dca": {
        # untied output layer, biases, GELU MLP and LayerNorm: the other layouts
        "model": {
            "tie_embeddings": False,
            "add_bias_linear": True,
            "activation": "gelu",
            "normalization": "LayerNorm",
        },
        "attention": {
            "variant": "dca",
            "dca": {"chunk_size": 8, "local_size": 3, "original_max_position_embeddings": 6},
        },
    },
    "hybrid_swa_nope": {
        "model": {"num_layers": 4},
        "attention": {
            "variant": "hybrid",
            "qk_norm": "layernorm_pre_rope",
            "hybrid": {"preset": "cohere2", "nope_every": 2, "window": 5},
        },
    },
    "chunked_nope_temperature": {
        "model": {"num_layers": 4},
        "attention": {
            "variant": "hybrid",
            "qk_norm": "l2_post_rope",
            "hybrid": {
                "preset": "llama4",
                "nope_every": 2,
                "chunk": 6,
                "floor_scale": 4,
                "attn_scale": 0.5,
            },
        },
    },
}

# Parameter name -> tensor-parallel split dim (None: replicated on every TP rank).
_SPLIT_DIMS = (
    (r"embedding\.word_embeddings\.weight$", 0),  # vocab-parallel
    (r"output_layer\.weight$", 0),  # vocab-parallel
    (r"linear_qkv\.(weight|bias)$", 0),  # column-parallel, whole query groups per rank
    (r"linear_fc1\.(weight|bias)$", 0),  # column-parallel (SwiGLU: stride 2)
    (r"(linear_proj|linear_fc2)\.weight$", 1),  # row-parallel
)
# Replicated weights applied per head (QK layernorm): each TP rank's gradient covers only its
# own heads, and Megatron's finalize_model_grads sums them over the TP group.
_PARTIAL_GRADS = r"(q_layernorm|k_layernorm)\.(weight|bias)$"


def expected_split(name: str, gated: bool) -> tuple[int | None, int]:
    """(split dim or None, stride) of a parameter in our layout table."""
    for pattern, dim in _SPLIT_DIMS:
        if re.search(pattern, name):
            return dim, 2 if gated and "linear_fc1" in name else 1
    return None, 1


def gather_shards(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Undo Megatron's split: rank r holds master pieces r, r + tp, ... (stride pieces each)."""
    tp = len(shards)
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(tp)], dim=dim)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, labels, per-document positions and doc ids [B, S]: row 0 packs two documents."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    ar = torch.arange(S)
    doc = torch.stack([(ar >= SPLIT).long(), torch.zeros(S, dtype=torch.long)])
    pos = torch.stack([torch.where(ar >= SPLIT, ar - SPLIT, ar), ar])
    return tokens, labels, pos, doc


def _run_variant(name: str, tp: int) -> dict:
    """Build `name` at TP=`tp` (parallel state already set), one fwd+bwd; this rank's tensors."""
    spec = VARIANTS[name]
    cfg = config_from_dict(
        {"model": {**_BASE_MODEL, **spec["model"]}, "attention": spec["attention"]}
    )
    torch.manual_seed(0)
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=VOCAB, tp=tp).double()
    tokens, labels, pos, doc = _batch()
    with torch.no_grad():
        loss = gpt_forward(model, tokens, positions=pos, doc_ids=doc, labels=labels)
    # [B, S, VOCAB / tp]: this rank's vocab slice
    logits = gpt_forward(model, tokens, positions=pos, doc_ids=doc)
    # a fixed fp64 cotangent on the full logits, this rank's vocab slice of it
    cotangent = torch.randn(
        B, S, VOCAB, generator=torch.Generator().manual_seed(99), dtype=torch.float64
    )
    rank, width = ps.get_tensor_model_parallel_rank(), VOCAB // tp
    (logits * cotangent[..., rank * width : (rank + 1) * width]).sum().backward()
    params = dict(model.named_parameters())
    return {
        "loss": loss,
        "logits": logits.detach(),
        "params": {k: p.detach().clone() for k, p in params.items()},
        "grads": {k: p.grad for k, p in params.items()},
        "attrs": {
            k: (
                bool(getattr(p, "tensor_model_parallel", False)),
                getattr(p, "partition_dim", -1),
                getattr(p, "partition_stride", 1),
            )
            for k, p in params.items()
        },
        "gated": model.config.gated_linear_unit,
    }


def _tp_worker(rank: int, group: dist.ProcessGroup, out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    results: dict = {}
    for name in VARIANTS:
        results[name] = {}
        for tp in (1, 2):
            ps.initialize_model_parallel(tensor_model_parallel_size=tp)
            try:
                results[name][tp] = _run_variant(name, tp)
            finally:
                ps.destroy_model_parallel()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{variant: {"tp1": rank-0 results, "tp2": [rank 0, rank 1] results}} from one world."""
    tmp = tmp_path_factory.mktemp("tp")
    run_distributed(_tp_worker, 2, tmp, out_dir=str(tmp))
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {
        name: {"tp1": ranks[0][name][1], "tp2": [ranks[r][name][2] for r in range(2)]}
        for name in VARIANTS
    }


def _gathered(shards: list[dict], kind: str, gated: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key in shards[0][kind]:
        dim, stride = expected_split(key, gated)
        parts = [s[kind][key] for s in shards]
        if dim is not None:
            out[key] = gather_shards(parts, dim, stride)
        elif kind == "grads" and re.search(_PARTIAL_GRADS, key):
            out[key] = torch.stack(parts).sum(0)
        else:
            out[key] = parts[0]
    return out


CASES = [pytest.param(name, id=name) for name in VARIANTS]


@pytest.mark.distributed
@pytest.mark.parametrize("name", CASES)
def test_layout_table_matches_megatron_attributes(tp_results: dict, name: str) -> None:
    tp2 = tp_results[name]["tp2"][0]
    for key, (is_split, dim, stride) in tp2["attrs"].items():
        want_dim, want_stride = expected_split(key, tp2["gated"])
        assert is_split == (want_dim is not None), key
        if is_split:
            assert (dim, stride) == (want_dim, want_stride), key


@pytest.mark.distributed
@pytest.mark.parametrize("name", CASES)
def test_replicated_parameters_agree_across_ranks(tp_results: dict, name: str) -> None:
    r0, r1 = tp_results[name]["tp2"]
    replicated = [k for k in r0["params"] if expected_split(k, r0["gated"])[0] is None]
    assert any("layernorm" in k for k in replicated)
    for key in replicated:
        assert torch.equal(r0["params"][key], r1["params"][key]), key
        if re.search(_PARTIAL_GRADS, key):
            continue  # per-rank partial sums; their total is checked against TP=1 below
        torch.testing.assert_close(
            r0["grads"][key], r1["grads"][key], rtol=1e-10, atol=1e-10, msg=key
        )


@pytest.mark.distributed
@pytest.mark.parametrize("name", CASES)
def test_tp2_weights_gather_to_tp1_exactly(tp_results: dict, name: str) -> None:
    tp1, tp2 = tp_results[name]["tp1"], tp_results[name]["tp2"]
    gathered = _gathered(tp2, "params", tp1["gated"])
    assert gathered.keys() == tp1["params"].keys()
    for key, value in tp1["params"].items():
        assert torch.equal(gathered[key], value), key


@pytest.mark.distributed
@pytest.mark.parametrize("name", CASES)
def test_tp2_logits_and_loss_equal_tp1(tp_results: dict, name: str) -> None:
    tp1, tp2 = tp_results[name]["tp1"], tp_results[name]["tp2"]
    assert tp1["logits"].shape == (B, S, VOCAB)
    logits = torch.cat([r["logits"] for r in tp2], dim=-1)  # vocab-parallel output
    torch.testing.assert_close(logits, tp1["logits"], rtol=1e-10, atol=1e-10)
    for r in tp2:  # the vocab-parallel cross entropy gives every rank the full loss
        torch.testing.assert_close(r["loss"], tp1["loss"], rtol=1e-6, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("name", CASES)
def test_tp2_gradients_equal_tp1(tp_results: dict, name: str) -> None:
    tp1, tp2 = tp_results[name]["tp1"], tp_results[name]["tp2"]
    assert all(g is not None for g in tp1["grads"].values())
    assert all(g is not None for r in tp2 for g in r["grads"].values())
    grads = _gathered(tp2, "grads", tp1["gated"])
    assert grads.keys() == tp1["grads"].keys()
    for key, value in tp1["grads"].items():
        assert value.abs().max() > 0, f"{key}: zero gradient, the comparison would be vacuous"
        torch.testing.assert_close(grads[key], value, rtol=1e-10, atol=1e-10, msg=key)


def test_gather_shards_undoes_strided_split() -> None:
    master = torch.arange(24.0).reshape(8, 3)
    pieces = master.split(2, dim=0)  # tp=2, stride=2: rank r holds pieces r and r + 2
    shards = [torch.cat(pieces[r::2]) for r in range(2)]
    assert torch.equal(gather_shards(shards, 0, 2), master)
    assert torch.equal(gather_shards(list(master.split(4, dim=0)), 0, 1), master)
