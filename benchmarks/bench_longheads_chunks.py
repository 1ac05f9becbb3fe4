"""LongHeads: attending a block's selected chunks through their union vs by per-query gather.

One block of n = w query rows (what chunked prefill and the whole-sequence op hand to
``_attend_chunks``) at the end of a 128-chunk sequence. Each query selects chunk 0, its own and
the previous chunk, and K - 3 chunks drawn from a pool; the pool size sets U, the number of
distinct chunks the block selects. Both paths run in the same process on the same inputs; the
table gives milliseconds per block and their ratio, which is what ``_use_union`` in
``megatron_ext/ops/longheads/interface.py`` is set from.

    python benchmarks/bench_longheads_chunks.py --write
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from doc_tables import publish  # noqa: E402

import megatron_ext.ops.longheads.interface as lh  # noqa: E402

SHAPES = ((128, 4, 64), (256, 16, 64), (128, 4, 128), (256, 16, 16))  # (w, K, D)
POOLS = (4, 8, 16, 32, 64, 124)


def _selection(h: int, n: int, k: int, last: int, pool: int, gen: torch.Generator) -> torch.Tensor:
    """[1, h, n, k] ascending chunk ids: 0, k - 3 drawn from a pool of 1..last-2, last-1, last."""
    cand = torch.randperm(last - 2, generator=gen)[: max(pool, k)] + 1
    rows = []
    for _ in range(h * n):
        free = cand[torch.randperm(len(cand), generator=gen)[: k - 3]].sort().values
        rows.append(torch.cat([torch.tensor([0]), free, torch.tensor([last - 1, last])]))
    return torch.stack(rows).view(1, h, n, k)


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--chunks", type=int, default=128, help="chunks in the sequence")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    a = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    H, nck = a.heads, a.chunks
    lines = [f"CPU ({platform.processor() or platform.machine()}), "
             f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, fp32; "
             f"H = {H}, one block of w query rows in chunk {nck - 1}. "
             "`python benchmarks/bench_longheads_chunks.py --write`", "",
             "| w | K | D | distinct chunks U | union ms | gather ms | union / gather |",
             "|---|---|---|---|---|---|---|"]
    saved = lh._use_union
    try:
        for w, K, D in SHAPES:
            kc = torch.randn(H * nck, w, D, generator=gen)
            vc = torch.randn(H * nck, w, D, generator=gen)
            q = torch.randn(1, w, H, D, generator=gen)
            pos = (nck - 1) * w + torch.arange(w)
            for pool in POOLS:
                ch = _selection(H, w, K, nck - 1, pool, gen)
                U = int(lh._chunk_union(ch.reshape(H, -1))[0].shape[1])
                ms = {}
                for name in ("union", "gather"):
                    lh._use_union = lambda *a, _u=name == "union": _u
                    args = (q, kc, vc, ch, pos, H, w, 1e4, None)
                    ms[name] = 1e3 * _time(lambda args=args: lh._attend_chunks(*args), a.reps)
                lines.append(f"| {w} | {K} | {D} | {U} | {ms['union']:.1f} | "
                             f"{ms['gather']:.1f} | {ms['union'] / ms['gather']:.2f} |")
    finally:
        lh._use_union = saved
    publish("longheads-chunks", "LongHeads chunk attention: union vs gather "
            "(benchmarks/bench_longheads_chunks.py)", lines, a.write)


if __name__ == "__main__":
    main()
