"""Whole-model context parallelism: GPTModel loss and every parameter gradient with CP = 2 and
CP = 4 (gloo) equal the same model at CP = 1 on the same global batch.

The batch is packed and awkward on purpose: an odd length (37, so zigzag slices need padding),
a document boundary inside a shard, and a document continued from an earlier sample (positions
starting at 37), so the position rules (DCA chunks and temperature, Llama-4 chunks and
temperature, sliding windows across shard boundaries) are exercised across ranks. fp32
throughout; the tolerance (1e-5 relative to each tensor's scale) is the ops' fp32 budget, since
CP only reorders the same sums.

Dynamic NTK (RoPE, CoCA, DCA) checks the one length rule: L is the largest position of the
*global* batch + 1 (57 here, past L0 = 16, so theta really changes), computed once per batch, so
a rank whose shard holds only small positions still rotates with the global L; and a fixed
``seq_len`` (80) is honoured by every rank. ChunkLlama's knobs (position interpolation, mscale)
with partial rotary run the same way. The model is called through ``gpt_forward`` exactly
as training does.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from utils import run_distributed

S, B, V = 37, 2, 64

NTK = ["attention.rope_scaling.type=dynamic", "attention.rope_scaling.factor=2.0",
       "attention.rope_scaling.original_max_position_embeddings=16"]
DCA = ["attention.variant=dca", "attention.dca.chunk_size=11", "attention.dca.local_size=4",
       "attention.dca.original_max_position_embeddings=16"]
CASES = [  # name, overrides, layout, algorithm, fixed seq_len
    ("rope", ["attention.variant=rope"], "zigzag", "ring", None),
    ("rope-contig-allgather", ["attention.variant=rope"], "contiguous", "allgather", None),
    ("rope-a2a", ["attention.variant=rope"], "zigzag", "a2a", None),
    ("coca", ["attention.variant=coca"], "zigzag", "ring", None),
    ("dca", DCA, "zigzag", "ring", None),
    ("hybrid-swa", ["model.num_layers=4", "attention.variant=hybrid",
                    "attention.hybrid.preset=cohere2", "attention.hybrid.window=6"],
     "zigzag", "ring", None),
    ("hybrid-chunked", ["model.num_layers=4", "attention.variant=hybrid",
                        "attention.hybrid.preset=llama4", "attention.hybrid.chunk=8",
                        "attention.hybrid.floor_scale=16", "attention.qk_norm=l2_post_rope"],
     "contiguous", "ring", None),
    ("rope-ntk", ["attention.variant=rope", *NTK], "zigzag", "ring", None),
    ("coca-ntk", ["attention.variant=coca", *NTK], "zigzag", "allgather", None),
    ("dca-ntk", [*DCA, *NTK], "zigzag", "ring", None),
    ("dca-ntk-seq-len", [*DCA, *NTK], "contiguous", "ring", 80),
    ("dca-chunkllama-partial", [*DCA, "attention.dca.scaling_factor=2.0",
                                "attention.dca.extension_factor=4.0",
                                "attention.rotary_percent=0.5"], "zigzag", "allgather", None),
    ("coca-neox-partial", ["attention.variant=coca", "attention.rotary_percent=0.5"], "zigzag",
     "ring", None),
]
NTK_CASES = [c for c in CASES if "ntk" in c[0]]


def _loss(model, batch: dict, cp: tuple[str, int, int] | None, seq_len: int | None):
    """Summed loss and token count of this rank's tokens, as training computes them."""
    from megatron_ext.layers.forward import gpt_forward
    from megatron_ext.parallel.batch import cp_shard_batch

    lay = None
    tokens, labels, pos, doc = batch["tokens"], batch["labels"], batch["positions"], \
        batch["doc_ids"]
    if cp is not None:
        layout, size, rank = cp
        local, lay = cp_shard_batch(batch, layout=layout, world_size=size, rank=rank)
        tokens, labels, pos, doc = local["tokens"], local["labels"], local["positions"], None
    mask = labels != -100
    per = gpt_forward(model, tokens, positions=pos, doc_ids=doc, cp_layout=lay, seq_len=seq_len,
                      labels=labels.masked_fill(~mask, 0))
    return (per * mask).sum(), mask.sum()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, V, (B, S), generator=g)
    labels = torch.roll(tokens, -1, 1)
    doc_ids = torch.zeros(B, S, dtype=torch.long)
    doc_ids[0, 20:] = 1  # boundary inside a shard
    positions = torch.arange(S).repeat(B, 1)
    positions[0, :20] += 37  # a document continued from an earlier sample
    positions[0, 20:] -= 20
    labels[0, 19] = -100
    labels[:, -1] = -100
    return {"tokens": tokens, "labels": labels, "positions": positions, "doc_ids": doc_ids}


def _worker(rank: int, group, cp_size: int, cases: list) -> None:
    from megatron.core import parallel_state as ps

    from megatron_ext.config import load_config
    from megatron_ext.specs import build_gpt_model

    batch = _batch()
    for name, overrides, layout, algo, seq_len in cases:
        cfg = load_config(None, ["model.num_query_groups=2", *overrides])
        ps.initialize_model_parallel(1, context_parallel_size=1)
        torch.manual_seed(1)
        ref = build_gpt_model(cfg.model, cfg.attention, vocab_size=V)
        s, n = _loss(ref, batch, None, seq_len)
        ref_loss = (s / n).item()
        (s / n).backward()
        ps.destroy_model_parallel()

        ps.initialize_model_parallel(1, context_parallel_size=cp_size)
        cp_group = ps.get_context_parallel_group()
        torch.manual_seed(1)
        model = build_gpt_model(cfg.model, cfg.attention, vocab_size=V, cp=cp_size,
                                cp_algorithm=algo)
        for (k, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a, b), (name, k)
        s, n = _loss(model, batch, (layout, cp_size, ps.get_context_parallel_rank()), seq_len)
        tot = torch.stack([s.detach(), n.float()])
        dist.all_reduce(tot, group=cp_group)
        (s / tot[1]).backward()
        loss = (tot[0] / tot[1]).item()
        assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss)), (name, loss, ref_loss)
        for (k, a), b in zip(ref.named_parameters(), model.parameters()):
            g = b.grad.clone()
            dist.all_reduce(g, group=cp_group)
            err = (g - a.grad).abs().max().item()
            scale = a.grad.abs().max().item()
            assert err <= 1e-5 * max(scale, 1e-3), (name, k, err, scale)
        ps.destroy_model_parallel()


@pytest.mark.distributed
def test_cp2_equals_cp1(tmp_path) -> None:
    run_distributed(_worker, 2, tmp_path, cp_size=2, cases=CASES)


@pytest.mark.distributed
@pytest.mark.slow
def test_cp4_equals_cp1(tmp_path) -> None:
    picked = [c for c in CASES if c[0] in ("rope", "dca", "coca", "hybrid-swa", "hybrid-chunked")]
    run_distributed(_worker, 4, tmp_path, cp_size=4, cases=picked)


@pytest.mark.distributed
def test_cp4_equals_cp1_dynamic_ntk(tmp_path) -> None:
    run_distributed(_worker, 4, tmp_path, cp_size=4, cases=NTK_CASES)


def test_dynamic_ntk_changes_the_logits() -> None:
    """The NTK cases above are not vacuous: at L = 57 > L0 = 16 the rotation differs."""
    from megatron_ext.ops import RopeScaling, apply_rope

    x = torch.randn(1, 5, 2, 8)
    pos = torch.arange(5)
    ntk = RopeScaling("dynamic", 2.0, original_max_position_embeddings=16)
    assert not torch.allclose(apply_rope(x, pos, scaling=ntk, seq_len=57), apply_rope(x, pos))
    assert torch.allclose(apply_rope(x, pos, scaling=ntk, seq_len=16), apply_rope(x, pos))
