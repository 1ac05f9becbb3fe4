"""Benchmark attention ops (forward + backward) against a baseline and write docs/benchmarks.md.

Each row of the table is a registered ``BenchCase``: an op of ours and the baseline it should be
compared with (by default torch SDPA, the best attention available on CPU), on the same inputs.
Other ops add rows by calling ``register(BenchCase(...))`` in the "Cases" section below.

Timing: one warm-up per implementation, then the median of ``--reps`` forward+backward runs
per implementation, alternating ours / baseline so that load from other processes hits both
alike; the speed ratio
is baseline_time / our_time from the same run (> 1 means ours is faster).

Peak memory: each (case, S) runs in a fresh subprocess. On CUDA, ``max_memory_allocated``
minus the allocation before the run. On CPU, torch has no allocator statistics, so we reset the
kernel's RSS high-water mark (``/proc/self/clear_refs``) before one run and report
``VmHWM - VmRSS_before``: the extra resident memory the run needed (inputs excluded, outputs,
saved activations, gradients and workspaces included). The child runs with a fixed glibc mmap
threshold, so buffers >= 64 KiB are mmap-backed and go back to the OS when freed: this tracks
tensor memory closely (RSS counters are exact to a few hundred KiB).

FLOP/s use the flash-attention convention: forward ``4 * B * H * D * pairs`` (two matmuls),
backward 2.5x forward, where ``pairs`` is the number of visible (query, key) pairs of the mask.

Usage::

    python benchmarks/bench_ops.py --quick            # small S smoke test, prints only
    python benchmarks/bench_ops.py --write            # S = 1K..16K, updates docs/benchmarks.md
    python benchmarks/bench_ops.py --write --cases causal window512 --threads 1

``--write`` replaces only the sections of the cases that ran (one marked section per case).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import doc_tables  # noqa: E402

from megatron_ext.ops import (  # noqa: E402
    attention_func,
    coca_attn_func,
    dual_chunk_attn_func,
)

DOC = ROOT / "docs" / "benchmarks.md"
FULL_SIZES = (1024, 2048, 4096, 8192, 16384)
QUICK_SIZES = (256, 512, 1024)


@dataclass(frozen=True)
class BenchCase:
    """One table row family: ``ours`` vs ``baseline`` on inputs from ``setup``.

    Attributes:
        name: row label (unique).
        ours_label: what ``ours`` runs.
        base_label: what ``baseline`` runs.
        setup: (S, device) -> dict of input tensors (leaves with requires_grad where needed).
        ours: inputs -> output tensor (the benchmark backpropagates its sum).
        baseline: inputs -> output tensor.
        pairs: S -> number of visible (query, key) pairs, for FLOP/s.
        heads, head_dim, batch: for FLOP/s.
    """

    name: str
    ours_label: str
    base_label: str
    setup: Callable[[int, torch.device], dict]
    ours: Callable[[dict], torch.Tensor]
    baseline: Callable[[dict], torch.Tensor]
    pairs: Callable[[int], int]
    heads: int
    head_dim: int
    batch: int = 1


CASES: dict[str, BenchCase] = {}


def register(case: BenchCase) -> None:
    """Add a case (name must be new)."""
    if case.name in CASES:
        raise ValueError(f"case name={case.name!r} already registered")
    CASES[case.name] = case


# ----------------------------------------------------------------------------- Cases
B, H, D, WINDOW = 1, 8, 64, 512


def qkv_setup(S: int, device: torch.device, *, heads: int = H, kv_heads: int = H) -> dict:
    """q [B, S, H, D], k / v [B, S, Hkv, D], fp32 leaves."""
    g = torch.Generator().manual_seed(0)
    mk = lambda h: torch.randn(B, S, h, D, generator=g).to(device).requires_grad_()  # noqa: E731
    return {"q": mk(heads), "k": mk(kv_heads), "v": mk(kv_heads)}


def sdpa(x: dict, *, is_causal: bool = True, attn_mask: torch.Tensor | None = None):
    """torch SDPA on [B, S, H, D] inputs (transposed to its [B, H, S, D] layout)."""
    q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, attn_mask=attn_mask)


def window_mask(S: int, W: int, device: torch.device) -> torch.Tensor:
    i, j = torch.arange(S, device=device)[:, None], torch.arange(S, device=device)[None]
    return (j <= i) & (j > i - W)


def causal_pairs(S: int) -> int:
    return S * (S + 1) // 2


def window_pairs(S: int, W: int = WINDOW) -> int:
    return sum(min(i + 1, W) for i in range(S))


register(BenchCase(
    "causal", "attention_func (auto: fused CPU kernel)", "SDPA is_causal", qkv_setup,
    lambda x: attention_func(x["q"], x["k"], x["v"])[0], sdpa, causal_pairs, H, D,
))  # fmt: skip
register(BenchCase(
    "causal/blockwise", "attention_func backend=cpu_blockwise", "SDPA is_causal", qkv_setup,
    lambda x: attention_func(x["q"], x["k"], x["v"], backend="cpu_blockwise")[0], sdpa,
    causal_pairs, H, D,
))  # fmt: skip
register(BenchCase(
    f"window{WINDOW}", f"attention_func window={WINDOW}", "SDPA + bool window mask",
    lambda S, dev: {**qkv_setup(S, dev), "mask": window_mask(S, WINDOW, dev)},
    lambda x: attention_func(x["q"], x["k"], x["v"], window=WINDOW)[0],
    lambda x: sdpa(x, is_causal=False, attn_mask=x["mask"]), window_pairs, H, D,
))  # fmt: skip
# Other ops: register(BenchCase(...)) here, e.g. dual_chunk_attn_func vs plain causal.
# CoCA vs plain attention on (q, k, v) of the same shapes (t takes k's place); issue target:
# CoCA <= 1.15x the time of plain attention, i.e. speed ratio >= 0.87.
for _form in ("slack", "strict"):
    register(BenchCase(
        f"coca/{_form}", f"coca_attn_func form={_form}", "attention_func (plain causal)",
        qkv_setup, lambda x, f=_form: coca_attn_func(x["q"], x["k"], x["v"], form=f),
        lambda x: attention_func(x["q"], x["k"], x["v"])[0], causal_pairs, H, D,
    ))  # fmt: skip


# DCA vs plain causal attention_func on the same (q, k, v); DCA's time includes its RoPE
# rotations (three of q, one of k), the baseline has none. Issue target: DCA <= 1.3x the time
# of plain causal, i.e. speed ratio >= 0.77. M = 1024, W = 128 gives chunk length C = 896, so
# S = 16K has 19 chunks.
DCA_M, DCA_W = 1024, 128
register(BenchCase(
    f"dca/C{DCA_M - DCA_W}", f"dual_chunk_attn_func M={DCA_M} W={DCA_W}",
    "attention_func (plain causal)", qkv_setup,
    lambda x: dual_chunk_attn_func(x["q"], x["k"], x["v"], chunk_size=DCA_M, local_size=DCA_W),
    lambda x: attention_func(x["q"], x["k"], x["v"])[0], causal_pairs, H, D,
))  # fmt: skip


# ----------------------------------------------------------------------------- Runner
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter
"""Timer: wall clock (default) or, with --clock cpu, this process's CPU time, which stays
meaningful on a shared machine when torch runs one thread (it then equals the compute time)."""


def _fwd_bwd(fn: Callable[[dict], torch.Tensor], x: dict, device: torch.device) -> float:
    for t in x.values():
        t.grad = None
    _sync(device)
    t0 = CLOCK()
    fn(x).sum().backward()
    _sync(device)
    return CLOCK() - t0


def _rss_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    get = lambda k: int(re.search(rf"{k}:\s+(\d+)", status).group(1))  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def _peak_mib(fn: Callable[[dict], torch.Tensor], x: dict, device: torch.device) -> float:
    for t in x.values():
        t.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(x).sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before, _ = _rss_kib()
    fn(x).sum().backward()
    return (_rss_kib()[1] - before) / 1024


def measure(name: str, S: int, device: str, reps: int, threads: int, clock: str = "wall"
            ) -> dict:
    """Time and measure one (case, S) in this process; returns a result row."""
    global CLOCK
    CLOCK = time.process_time if clock == "cpu" else time.perf_counter
    if threads > 0:
        torch.set_num_threads(threads)
    case, dev = CASES[name], torch.device(device)
    x = case.setup(S, dev)
    impls = {"ours": case.ours, "base": case.baseline}
    for fn in impls.values():  # warm-up: lazy initialisation must not count as peak memory
        _fwd_bwd(fn, x, dev)
    mem = {k: _peak_mib(fn, x, dev) for k, fn in impls.items()}
    times: dict[str, list[float]] = {"ours": [], "base": []}
    for _ in range(reps):
        for k, fn in impls.items():
            times[k].append(_fwd_bwd(fn, x, dev))
    t = {k: statistics.median(v) for k, v in times.items()}
    flops = 4 * case.batch * case.heads * case.head_dim * case.pairs(S) * 3.5
    return {
        "case": name, "S": S, "ours_ms": 1e3 * t["ours"], "base_ms": 1e3 * t["base"],
        "ratio": t["base"] / t["ours"], "ours_gflops": flops / t["ours"] / 1e9,
        "ours_mib": mem["ours"], "base_mib": mem["base"],
    }  # fmt: skip


def run_child(name: str, S: int, device: str, reps: int, threads: int, clock: str = "wall"
              ) -> dict:
    cmd = [sys.executable, __file__, "--child", name, str(S), device, str(reps), str(threads),
           clock]
    # A fixed glibc mmap threshold: buffers >= 64 KiB are mmap-backed and returned to the OS
    # when freed (the default dynamic threshold would serve the measured run from memory
    # cached during the warm-up, hiding it from the RSS high-water mark).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child {name} S={S} failed (exit {res.returncode}):\n"
                           f"{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def device_name(device: str, threads: int) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    n = threads if threads > 0 else torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores), {n} threads"


def table(rows: list[dict], device: str, threads: int, command: str) -> str:
    """Markdown: a provenance line, the command, and one row per (case, S)."""
    head = [
        f"Device: {device_name(device, threads)}; date: {datetime.date.today().isoformat()}; "
        f"torch {torch.__version__}; fp32, B={B}, H={H}, D={D}.",
        f"Command: `{command}`",
        "",
        "| case | ours | baseline | S | ours ms | baseline ms | speed ratio (base/ours) "
        "| ours GFLOP/s | ours peak MiB | baseline peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    body = [
        f"| {r['case']} | {CASES[r['case']].ours_label} | {CASES[r['case']].base_label} "
        f"| {r['S']} | {r['ours_ms']:.1f} | {r['base_ms']:.1f} | {r['ratio']:.2f} "
        f"| {r['ours_gflops']:.1f} | {r['ours_mib']:.1f} | {r['base_mib']:.1f} |"
        for r in rows
    ]
    return "\n".join(head + body)


def write_section(name: str, text: str) -> None:
    """Replace (or append) case ``name``'s section of docs/benchmarks.md; keep all others."""
    doc_tables.write_section(f"bench_ops:{name}", f"{name} (benchmarks/bench_ops.py)", text, DOC)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"S in {QUICK_SIZES}, print only")
    p.add_argument("--sizes", type=int, nargs="*", help="override the sequence lengths")
    p.add_argument("--cases", nargs="*", help=f"subset of {list(CASES)}")
    p.add_argument("--reps", type=int, default=3, help="timed runs per implementation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or process CPU time (use with --threads 1 on a busy host)")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        name, S, device, reps, threads, clock = args.child
        print(json.dumps(measure(name, int(S), device, int(reps), int(threads), clock)))
        return
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    names = args.cases or list(CASES)
    for n in names:
        if n not in CASES:
            raise ValueError(f"--cases {n!r}; expected names from {list(CASES)}")
    command = "python benchmarks/bench_ops.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    rows = []
    for n in names:
        for S in sizes:
            rows.append(run_child(n, S, args.device, args.reps, args.threads, args.clock))
            r = rows[-1]
            print(f"{n:18s} S={S:6d} ours {r['ours_ms']:9.1f} ms  base {r['base_ms']:9.1f} ms  "
                  f"ratio {r['ratio']:.2f}  mem {r['ours_mib']:.1f} / {r['base_mib']:.1f} MiB",
                  flush=True)  # fmt: skip
        if args.write and not args.quick:  # each case as soon as it is complete
            case_rows = [r for r in rows if r["case"] == n]
            write_section(n, table(case_rows, args.device, args.threads, command.strip()))
            print(f"wrote {n} into {DOC.relative_to(ROOT)}", flush=True)
    print(table(rows, args.device, args.threads, command.strip()))


if __name__ == "__main__":
    main()
