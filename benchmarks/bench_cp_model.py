"""Benchmark a whole model under context parallelism: forward + backward of a 4-layer GPT, CP=2.

Two ranks (spawned processes meeting via a FileStore, gloo, one thread each) run a
megatron_ext GPTModel on their zigzag shards of one packed global batch, exactly as training
does (``cp_shard_batch`` + ``gpt_forward``), and time loss forward + backward (median of
``--reps`` after one warm-up; the slowest rank counts). Variants: RoPE, DCA, CoCA and a
Cohere2-style hybrid (sliding window + NoPE).

``--json FILE`` saves the rows; ``--baseline FILE`` adds the rows of an earlier run (e.g. the
same script on an older commit) as a "before" column and the ratio; ``--write`` replaces the
marked ``bench_cp_model`` section of docs/benchmarks.md.

Usage::

    python benchmarks/bench_cp_model.py --seq 2048 --json after.json
    python benchmarks/bench_cp_model.py --seq 2048 --baseline before.json --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = {
    "rope": ["attention.variant=rope"],
    "dca": ["attention.variant=dca", "attention.dca.chunk_size=768",
            "attention.dca.local_size=256"],
    "coca": ["attention.variant=coca"],
    "hybrid-swa": ["attention.variant=hybrid", "attention.hybrid.preset=cohere2",
                   "attention.hybrid.window=256"],
}
MODEL = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=8",
         "model.num_query_groups=4", "model.max_position_embeddings=65536"]
VOCAB = 4096


def _batch(S: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (1, S), generator=g)
    doc_ids = torch.zeros(1, S, dtype=torch.long)
    doc_ids[0, S // 3 :] = 1  # two documents, the boundary inside a shard
    positions = torch.cat([torch.arange(S // 3), torch.arange(S - S // 3)]).unsqueeze(0)
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "positions": positions,
            "doc_ids": doc_ids}


def _worker(rank: int, store: str, S: int, reps: int, out: str, names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    from megatron.core import parallel_state as ps

    from megatron_ext.config import load_config
    from megatron_ext.layers.forward import gpt_forward
    from megatron_ext.parallel.batch import cp_shard_batch
    from megatron_ext.specs import build_gpt_model

    ps.initialize_model_parallel(1, context_parallel_size=2)
    cp_rank = ps.get_context_parallel_rank()
    rows = []
    for name in names:
        cfg = load_config(None, [*MODEL, *VARIANTS[name]])
        torch.manual_seed(0)
        model = build_gpt_model(cfg.model, cfg.attention, vocab_size=VOCAB, cp=2)
        times = []
        for i in range(reps + 1):
            batch = _batch(S)  # a fresh batch each step, as in training
            dist.barrier()
            t0 = time.perf_counter()
            local, lay = cp_shard_batch(batch, layout="zigzag", world_size=2, rank=cp_rank)
            loss = gpt_forward(model, local["tokens"], positions=local["positions"],
                               cp_layout=lay, labels=local["labels"]).float().mean()
            loss.backward()
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i:
                times.append(float(elapsed))
            model.zero_grad(set_to_none=True)
        rows.append({"variant": name, "S": S, "ms": 1e3 * statistics.median(times)})
        if rank == 0:
            print(f"{name:12s} S={S} {rows[-1]['ms']:9.1f} ms", flush=True)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", type=Path, help="save the rows here")
    ap.add_argument("--baseline", type=Path, help="rows of an earlier run: 'before' column")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), args.seq, args.reps, out,
                                args.variants), nprocs=2)
        rows = json.loads(Path(out).read_text())
    if args.json:
        args.json.write_text(json.dumps(rows))
    before = {}
    if args.baseline:
        before = {(r["variant"], r["S"]): r["ms"] for r in json.loads(args.baseline.read_text())}
    lines = ["| variant | S | before (ms) | after (ms) | after / before |", "|---|---|---|---|---|"]
    for r in rows:
        b = before.get((r["variant"], r["S"]))
        ratio = f"{r['ms'] / b:.2f}" if b else "-"
        lines.append(f"| {r['variant']} | {r['S']} | {b and f'{b:.1f}' or '-'} | "
                     f"{r['ms']:.1f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        import doc_tables

        shown = [Path(a).name if os.path.isabs(a) else a for a in sys.argv[1:]]
        cmd = " ".join(["python benchmarks/bench_cp_model.py", *shown])
        text = (
            f"4-layer GPT (hidden 256, 8 heads / 4 KV heads), one packed row of S tokens (two "
            f"documents), CP=2 zigzag over 2 gloo ranks with one thread each, loss forward + "
            f"backward including sharding the batch; median of {args.reps} after a warm-up, "
            f"slowest rank. {platform.processor() or platform.machine()}, torch "
            f"{torch.__version__}, {datetime.date.today()}. `{cmd}`.\n\n{table}\n"
        )
        doc_tables.write_section("bench_cp_model", "Whole model under CP=2 (CPU)", text)


if __name__ == "__main__":
    main()
