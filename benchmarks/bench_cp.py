"""Benchmark context-parallel attention plans: time and bytes sent per rank, on CPU gloo.

For every (variant, plan) row and sequence length S, P ranks (spawned processes meeting via a
FileStore, one thread each) run ``cp_attn_func`` forward + backward on their zigzag shards of
one global problem. Reported: the wall time of the slowest rank (median of ``--reps`` runs after
one warm-up), the bytes the busiest rank sent forward and backward (``parallel.bytes_sent``),
and, for reference, the single-process op on the whole problem in one process with one thread.

On a CPU host the P ranks share the machine's cores, so the times show the overhead and the
balance of each plan rather than a speed-up; the byte columns are exact and device-independent
(they match the analytic volumes of docs/context_parallel.md).

Usage::

    python benchmarks/bench_cp.py --quick                  # S = 1K, 2K; prints only
    python benchmarks/bench_cp.py --write --sizes 4096 8192 --world-sizes 2 4

``--write`` replaces the marked ``bench_cp`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import doc_tables  # noqa: E402

from megatron_ext.ops import (  # noqa: E402
    CoCAAttention,
    DCAParams,
    DualChunkAttention,
    RopeAttention,
    attention_func,
    coca_attn_func,
    dual_chunk_attn_func,
)
from megatron_ext.parallel import (  # noqa: E402
    bytes_sent,
    cp_attn_func,
    make_layout,
    reset_bytes_sent,
    shard,
)

DOC = ROOT / "docs" / "benchmarks.md"
B, H, HKV, D = 1, 8, 8, 64
QUICK_SIZES, FULL_SIZES = (1024, 2048), (4096, 8192, 16384, 32768, 65536)
DCA = {"chunk_size": 1536, "local_size": 512}
ROWS = [  # (label, attn, plan, kwargs)
    ("plain causal", "plain", "ring", {}),
    ("plain causal", "plain", "allgather", {}),
    ("plain causal", "plain", "a2a", {}),
    ("window 512", "window", "halo", {"window": 512}),
    ("window 512", "window", "ring", {"window": 512}),
    ("chunked 1024", "chunked", "halo", {"chunk": 1024}),
    ("DCA M=1536 W=512", "dca", "ring", DCA),
    ("CoCA slack", "coca", "ring", {}),
]


def _inputs(S: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(S)
    return [torch.randn(B, S, h, D, generator=g) for h in (H, HKV, HKV)]


def _single(attn: str, kw: dict, q, k, v) -> torch.Tensor:
    if attn == "dca":
        return dual_chunk_attn_func(q, k, v, **kw)
    if attn == "coca":
        return coca_attn_func(q, k, v, **kw)
    return attention_func(q, k, v, window=kw.get("window"), chunk=kw.get("chunk"))[0]


def _method(attn: str, kw: dict):
    """The method object the model would build for this row (what cp_attn_func runs)."""
    if attn == "dca":
        return DualChunkAttention(DCAParams(kw["chunk_size"], kw["local_size"]))
    if attn == "coca":
        return CoCAAttention()
    return RopeAttention(rope=None, window=kw.get("window"), chunk=kw.get("chunk"))


def _worker(rank: int, P: int, store: str, sizes, reps: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, P), rank=rank, world_size=P)
    results = []
    for label, attn, plan, kw in ROWS:
        for S in sizes:
            lay = make_layout("zigzag", S, P)
            shards = [shard(x, layout=lay, group=None).requires_grad_() for x in _inputs(S)]
            times, sent = [], {}
            for i in range(reps + 1):  # the first run warms up
                dist.barrier()
                reset_bytes_sent()
                t0 = time.perf_counter()
                cp_attn_func(
                    *shards, group=None, method=_method(attn, kw), plan=plan, layout=lay
                ).sum().backward()
                elapsed = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if i:
                    times.append(float(elapsed))
                sent = bytes_sent()
            fwd = sum(n for key, n in sent.items() if key.endswith(".fwd"))
            bwd = sum(n for key, n in sent.items() if key.endswith(".bwd"))
            most = torch.tensor([fwd, bwd], dtype=torch.float64)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            results.append({
                "label": label, "attn": attn, "plan": plan, "S": S, "P": P,
                "ms": 1e3 * statistics.median(times), "fwd_mib": float(most[0]) / 2**20,
                "bwd_mib": float(most[1]) / 2**20,
            })  # fmt: skip
            if rank == 0:
                r = results[-1]
                print(
                    f"P={P} {label:18s} {plan:9s} S={S:6d} {r['ms']:10.1f} ms  "
                    f"fwd {r['fwd_mib']:8.2f} MiB  bwd {r['bwd_mib']:8.2f} MiB",
                    flush=True,
                )
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def run_world(P: int, sizes, reps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(P, os.path.join(tmp, "store"), sizes, reps, out), nprocs=P)
        return json.loads(Path(out).read_text())


def single_process_ms(sizes, reps: int) -> dict:
    """Median fwd+bwd ms of the single-process op, one thread, per (attn, kwargs, S)."""
    torch.set_num_threads(1)
    out = {}
    for label, attn, _, kw in ROWS:
        for S in sizes:
            if (label, S) in out:
                continue
            times = []
            for i in range(reps + 1):
                x = [t.requires_grad_() for t in _inputs(S)]
                t0 = time.perf_counter()
                _single(attn, kw, *x).sum().backward()
                if i:
                    times.append(1e3 * (time.perf_counter() - t0))
            out[(label, S)] = statistics.median(times)
    return out


def table(rows: list[dict], single: dict, command: str) -> str:
    cpu = f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"
    head = [
        f"Device: {cpu}, gloo, 1 thread per rank (ranks share the cores); date: "
        f"{datetime.date.today().isoformat()}; torch {torch.__version__}; fp32, B={B}, H={H}, "
        f"Hkv={HKV}, D={D}, zigzag layout; forward + backward.",
        f"Command: `{command}`",
        "",
        "| variant | plan | P | S | CP ms (slowest rank) | 1 process ms | fwd MiB sent / rank "
        "| bwd MiB sent / rank |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    body = [
        f"| {r['label']} | {r['plan']} | {r['P']} | {r['S']} | {r['ms']:.1f} "
        f"| {single.get((r['label'], r['S']), float('nan')):.1f} | {r['fwd_mib']:.2f} "
        f"| {r['bwd_mib']:.2f} |"
        for r in rows
    ]
    return "\n".join(head + body)


def write_section(text: str) -> None:
    doc_tables.write_section("bench_cp", "Context parallelism (benchmarks/bench_cp.py)", text, DOC)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"S in {QUICK_SIZES}, print only")
    p.add_argument("--sizes", type=int, nargs="*", help=f"sequence lengths (default {FULL_SIZES})")
    p.add_argument("--world-sizes", type=int, nargs="*", default=[2, 4])
    p.add_argument("--reps", type=int, default=2, help="timed runs after one warm-up")
    p.add_argument("--no-single", action="store_true", help="skip the single-process column")
    p.add_argument("--note", default="", help="a line added under the table (e.g. why sizes)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    rows = []
    for P in args.world_sizes:
        rows += run_world(P, sizes, args.reps)
    single = {} if args.no_single else single_process_ms(sizes, args.reps)
    args_used = argv if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "benchmarks/bench_cp.py", *args_used])
    text = table(rows, single, command)
    if args.note:
        text += f"\n\n{args.note}"
    print(text)
    if args.write and not args.quick:
        write_section(text)


if __name__ == "__main__":
    main()
