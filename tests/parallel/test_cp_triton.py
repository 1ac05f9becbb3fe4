"""Context parallelism on the Triton interval kernel equals the single-process op.

With the "triton" backend forced on every rank (the kernels run under the Triton interpreter on
CPU), the ring, all-gather and halo plans call the Triton interval kernel for every block of
plain causal attention, a sliding window and DCA, on a packed batch (two documents per row, a
boundary inside a shard). Outputs and dq/dk/dv, gathered from CP=2 gloo ranks, must equal the
single-process op on the torch tiles: fp32, 1e-5 (the same sums in another order and in fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from method_factory import make_method
from utils import run_distributed

from megatron_ext.ops import force_backend
from megatron_ext.parallel import cp_attn_func, make_layout, shard, unshard

pytestmark = pytest.mark.distributed

B, S, H, HKV, D = 1, 20, 2, 1, 16
CASES = [("plain", {}, "ring"), ("plain", {}, "allgather"), ("window", {"window": 4}, "halo"),
         ("dca", {"chunk_size": 6, "local_size": 2}, "ring")]


def _check(rank: int, group) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, S, h, D, generator=g) for h in (H, HKV, HKV, H))
    doc_ids = torch.zeros(B, S, dtype=torch.long)
    doc_ids[:, 7:] = 1
    lay = make_layout("zigzag", S, dist.get_world_size(group), doc_ids=doc_ids)
    failures = []
    for attn, kw, plan in CASES:
        method = make_method(attn, **kw)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        meta_pos = torch.cat([torch.arange(7), torch.arange(S - 7)]).expand(B, S)
        with force_backend("torch_blockwise"):
            ref = method(*leaves, q_meta=_meta(meta_pos, doc_ids), k_meta=_meta(meta_pos, doc_ids))
        (ref * dout).sum().backward()
        want = [ref.detach()] + [t.grad for t in leaves]
        shards = [shard(t, layout=lay, group=group).requires_grad_() for t in (q, k, v)]
        with force_backend("triton"):
            out = cp_attn_func(*shards, group=group, method=method, plan=plan, layout=lay)
        out_g = unshard(out, layout=lay, group=group)
        (out_g * dout).sum().backward()
        got = [out_g.detach()] + [unshard(t.grad, layout=lay, group=group) for t in shards]
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            err = (a - b).abs().max().item()
            if not err <= 1e-5:
                failures.append(f"{attn} {plan} {name}: {err:.2e}")
    assert not failures, failures


def _meta(pos, doc):
    from megatron_ext.ops import token_meta

    return token_meta(pos, doc)


def test_cp2_on_triton_intervals_equals_single_process(tmp_path) -> None:
    run_distributed(_check, 2, tmp_path)
