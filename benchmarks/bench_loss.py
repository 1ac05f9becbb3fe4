"""Benchmark the loss's peak memory: full-logits cross-entropy vs the chunked one.

For N tokens (8K-64K), hidden size H and vocabulary V, one forward + backward of the per-token
cross-entropy of `hidden @ W.T` is run two ways:

- full: fp32 logits [N, V] materialised, `F.cross_entropy` (what a model's own loss does; the
  softmax saved for backward is another [N, V]);
- chunked: `megatron_ext.training.loss.chunked_cross_entropy` with `--chunk` tokens per chunk
  (logits recomputed per chunk in backward).

Peak memory is measured in a fresh process per case: on CUDA `max_memory_allocated` after
resetting it (inputs and their gradients included), on CPU the growth of the process's peak
resident set (`ru_maxrss`) over the figure after the inputs were allocated (so it counts what
the loss itself needs). The table also gives the size of one fp32 [N, V] logits tensor and the
time of forward + backward.

Usage::

    python benchmarks/bench_loss.py                      # 8K, 16K, 32K, 64K tokens; prints
    python benchmarks/bench_loss.py --write              # and replaces the bench_loss section
    python benchmarks/bench_loss.py --tokens 8192 --vocab 32000 --hidden 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_case(tokens: int, vocab: int, hidden: int, chunk: int, mode: str, device: str) -> dict:
    """One measurement in this process (call in a fresh process)."""
    from megatron_ext.training.loss import chunked_cross_entropy

    dev = torch.device(device)

    def loss_of(h, w, y):
        if mode == "full":
            return F.cross_entropy((h @ w.t()).float(), y, reduction="none")
        return chunked_cross_entropy(h, w, y, chunk_size=chunk)

    # warm-up on a small problem: libraries and kernels load before the baseline is taken
    small = torch.randn(64, hidden, device=dev, requires_grad=True)
    loss_of(small, torch.randn(vocab, hidden, device=dev, requires_grad=True),
            torch.zeros(64, dtype=torch.long, device=dev)).sum().backward()
    del small
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(dev).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(dev).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g).to(dev)
    h.grad = torch.zeros_like(h)  # gradients allocated up front: not the loss's memory
    w.grad = torch.zeros_like(w)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    loss = loss_of(h, w, y)
    loss.sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes() - base
    return {"tokens": tokens, "mode": mode, "peak_bytes": peak,
            "seconds": time.perf_counter() - t0, "loss": loss.mean().item()}


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for n in args.tokens:
        for mode in ("full", "chunked"):
            cmd = [sys.executable, __file__, "--case", str(n), mode, "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--chunk", str(args.chunk),
                   "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"case {n} {mode} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{n:>6} tokens  {mode:>7}: peak {row['peak_bytes'] / 2**20:8.1f} MiB  "
                  f"{row['seconds']:.2f} s  loss {row['loss']:.4f}", flush=True)
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    by = {(r["tokens"], r["mode"]): r for r in rows}
    dev = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, 1 thread)"
    lines = [
        f"Per-token cross-entropy forward + backward, hidden {args.hidden}, vocabulary "
        f"{args.vocab}, chunk {args.chunk} tokens; {dev}; torch {torch.__version__}; "
        f"{datetime.date.today()}.",
        "Peak = memory the loss adds over its inputs and their gradients "
        f"({'max_memory_allocated' if args.device == 'cuda' else 'growth of peak RSS'}). "
        "`python benchmarks/bench_loss.py --write`.",
        "",
        "| tokens | one fp32 [N, V] logits | full: peak | full: time | chunked: peak | "
        "chunked: time | peak ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.tokens:
        f, c = by[(n, "full")], by[(n, "chunked")]
        logits = n * args.vocab * 4
        lines.append(
            f"| {n:,} | {logits / 2**20:,.0f} MiB | {f['peak_bytes'] / 2**20:,.0f} MiB | "
            f"{f['seconds']:.2f} s | {c['peak_bytes'] / 2**20:,.0f} MiB | {c['seconds']:.2f} s "
            f"| {f['peak_bytes'] / max(c['peak_bytes'], 1):.1f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--write", action="store_true", help="replace the bench_loss section of "
                   "docs/benchmarks.md")
    p.add_argument("--case", nargs=2, metavar=("TOKENS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.case:
        n, mode = int(args.case[0]), args.case[1]
        print(json.dumps(run_case(n, args.vocab, args.hidden, args.chunk, mode, args.device)))
        return
    text = table(measure(args), args)
    print(text)
    if args.write:
        import doc_tables

        doc_tables.write_section("bench_loss", "Loss memory: chunked cross-entropy "
                                 "(benchmarks/bench_loss.py)", text)


if __name__ == "__main__":
    main()
