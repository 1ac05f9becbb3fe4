"""Inference benchmark: prefill tok/s, decode tok/s and peak RSS per method and prompt length.

    python benchmarks/bench_inference.py                       # 8k..128k, every method
    python benchmarks/bench_inference.py --lengths 8192 16384 --methods full dca

Every (method, length) runs in a fresh process (so peak RSS is that run's alone) on the same
tiny model shape (2 layers, hidden 64, 4 query / 2 KV heads, random weights: speed and memory
do not depend on what the weights say): a prompt of S random tokens is prefilled in chunks of
4096, then 16 tokens are decoded greedily through ``InferenceModel.generate``. Methods:

- full: causal RoPE (the baseline every other row is compared with, in the same run);
- dca: Dual Chunk Attention, chunk_size 768, local_size 128 (a model trained at 1024);
- longheads: chunk_len 64, num_chunks 8 (K * w = 512);
- hybrid: Cohere2 pattern, every 2nd layer NoPE full attention, the others RoPE with a 256-token
  sliding window (ring cache);
- coca: CoCA (its cache holds the pre-transformed keys).

Writes a table to docs/benchmarks.md (section ``inference``) and a plot to
docs/bench_inference.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

METHODS = {
    "full": ["attention.variant=rope"],
    "dca": ["attention.variant=dca", "attention.dca={chunk_size: 768, local_size: 128}"],
    "longheads": ["attention.variant=longheads",
                  "attention.longheads={chunk_len: 64, num_chunks: 8}"],
    "hybrid": ["attention.variant=hybrid",
               "attention.hybrid={preset: cohere2, window: 256, nope_every: 2}"],
    "coca": ["attention.variant=coca"],
}
SHAPE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.num_query_groups=2", "inference.max_seq_len=1000000"]
VOCAB = 97
NEW_TOKENS = 16


def run_one(method: str, length: int, device: str) -> dict:
    """One measurement in this process (the child side)."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_ext.config import load_config
    from megatron_ext.dist import init_distributed
    from megatron_ext.inference import from_model, peak_memory_bytes
    from megatron_ext.inference.loader import build_attention
    from megatron_ext.specs import build_gpt_model

    init_distributed(backend="gloo")
    ps.initialize_model_parallel(1)
    torch.manual_seed(0)
    cfg = load_config(None, [*SHAPE, *METHODS[method]])
    model = build_gpt_model(cfg.model, build_attention(cfg), vocab_size=VOCAB).to(device)
    m = from_model(model, cfg)
    ids = torch.randint(0, VOCAB, (length,)).tolist()
    t0 = time.perf_counter()
    m.generate([ids], max_new_tokens=NEW_TOKENS, prefill_chunk_size=4096, stop_tokens=[])
    st = m.last_stats
    return {"method": method, "length": length, "prefill_tok_s": st.prefill_tok_s,
            "decode_tok_s": st.decode_tok_s, "cache_mib": st.cache_bytes / 2**20,
            "peak_mib": peak_memory_bytes(torch.device(device)) / 2**20,
            "wall_s": time.perf_counter() - t0}


def _child(method: str, length: int, device: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, __file__, "--child", method, str(length), device],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{method} at {length}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], device: str) -> str:
    base = {r["length"]: r for r in rows if r["method"] == "full"}
    lines = [
        f"Tiny model (2 layers, hidden 64, 4/2 heads), random prompt of S tokens, prefill chunk "
        f"4096, {NEW_TOKENS} greedy decode steps; {device}, {platform.processor() or 'cpu'}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, {date.today()}. Peak RSS "
        "is the whole process (Python, torch and Megatron take ~0.4 GiB before any token). "
        "Command: `python benchmarks/bench_inference.py`.",
        "",
        "| method | S | prefill tok/s | vs full | decode tok/s | KV cache MiB | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (list(METHODS).index(r["method"]), r["length"])):
        ref = base.get(r["length"])
        rel = f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x" if ref else "-"
        lines.append(f"| {r['method']} | {r['length']:,} | {r['prefill_tok_s']:,.0f} | {rel} | "
                     f"{r['decode_tok_s']:,.1f} | {r['cache_mib']:,.1f} | "
                     f"{r['peak_mib']:,.0f} |")
    lines += ["", "![inference benchmark](bench_inference.png)"]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = [("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"),
            ("peak_mib", "peak RSS (MiB)")]
    for ax, (key, label) in zip(axes, keys):
        for method in METHODS:
            pts = sorted((r["length"], r[key]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, method, length, device = sys.argv
        r = run_one(method, int(length), device)
        r["peak_mib"] = max(r["peak_mib"],
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(r))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[8192, 16384, 32768, 65536, 131072])  # sorted below
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    args.lengths = sorted(args.lengths)
    rows = []
    for length in args.lengths:  # shortest first; the table is rewritten after each length
        for method in args.methods:
            r = _child(method, length, args.device)
            rows.append(r)
            print(f"{method:10s} S={length:>7,} prefill {r['prefill_tok_s']:>9,.0f} tok/s  "
                  f"decode {r['decode_tok_s']:>7,.1f} tok/s  cache {r['cache_mib']:>7,.1f} MiB  "
                  f"peak {r['peak_mib']:>7,.0f} MiB  ({r['wall_s']:.0f} s)", flush=True)
        if not args.no_write:
            _write(rows, args.device)


def _write(rows: list[dict], device: str) -> None:
    from doc_tables import DOC, write_section

    _plot(rows, DOC.parent / "bench_inference.png")
    write_section("inference", "Inference: prefill, decode and memory per method",
                  _table(rows, device))


if __name__ == "__main__":
    main()
