"""One training step of a whole model per attention method: tokens/s and model TFLOP/s.

A GPTModel of about 1B parameters (``--size 1b``: 16 layers, hidden 2048, 16 heads / 8 KV heads,
SwiGLU 5632) on one packed row of ``--seq`` tokens (two documents), bf16 on CUDA, is run
forward + backward with the loss through ``gpt_forward`` (the path training takes), for RoPE,
DCA (also with its passes on cuDNN pieces), CoCA and a Cohere2-style hybrid. Reported: median
step time of ``--reps`` after a warm-up, tokens/s, model TFLOP/s and MFU (over ``--peak-tflops``)
with FLOPs = 6 * params * tokens + causal attention (6 * layers * S^2 * hidden, forward +
backward, half the square). ``--size tiny`` runs the same on CPU in seconds (a smoke test of
the script). ``--write`` adds the table to docs/benchmarks.md (section ``bench_gpu_step``)
with the device named.

Usage::

    python benchmarks/bench_gpu_step.py                 # CUDA, 1B, S = 16384
    python benchmarks/bench_gpu_step.py --size tiny --seq 512 --reps 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {
    "1b": ["model.num_layers=16", "model.hidden_size=2048", "model.num_attention_heads=16",
           "model.num_query_groups=8", "model.ffn_hidden_size=5632",
           "model.max_position_embeddings=131072"],
    "tiny": ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
             "model.num_query_groups=2"],
}
METHODS = {
    "rope": ["attention.variant=rope"],
    "dca": ["attention.variant=dca", "attention.dca.chunk_size=6144",
            "attention.dca.local_size=1024"],
    "dca-cudnn-pieces": ["attention.variant=dca", "attention.dca.chunk_size=6144",
                         "attention.dca.local_size=1024"],
    "coca": ["attention.variant=coca"],
    "hybrid-swa": ["attention.variant=hybrid", "attention.hybrid.preset=cohere2",
                   "attention.hybrid.window=4096"],
}
FORCED = {"dca-cudnn-pieces": "sdpa"}
"""Methods run under a forced attention backend (the DCA passes on cuDNN pieces)."""
VOCAB = 32000


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak of the GPU for MFU (H100 / H200 SXM datasheet: 989)")
    args = ap.parse_args()

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_ext.config import load_config
    from megatron_ext.layers.forward import gpt_forward
    from megatron_ext.ops import force_backend
    from megatron_ext.specs import build_gpt_model

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    S = args.seq
    tokens = torch.randint(0, VOCAB, (1, S), device=dev)
    pos = torch.cat([torch.arange(S // 3), torch.arange(S - S // 3)]).unsqueeze(0)
    doc = torch.cat([torch.zeros(S // 3), torch.ones(S - S // 3)]).long().unsqueeze(0)
    rows = []
    for name in args.methods:
        cfg = load_config(None, [*SIZES[args.size], *METHODS[name]])
        model = build_gpt_model(cfg.model, cfg.attention, vocab_size=VOCAB,
                                dtype="bf16" if cuda else "fp32").to(dev)
        n_params = sum(p.numel() for p in model.parameters())
        times = []
        forced = force_backend(FORCED.get(name))
        forced.__enter__()
        for i in range(args.reps + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = gpt_forward(model, tokens, positions=pos, doc_ids=doc,
                               labels=torch.roll(tokens, -1, 1)).float().mean()
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        forced.__exit__(None, None, None)
        t = statistics.median(times)
        m = cfg.model
        flops = 6 * n_params * S + 6 * m.num_layers * S * S * m.hidden_size
        rows.append((name, n_params, t, S / t, flops / t / 1e12))
        print(f"{name:16s} params {n_params / 1e9:.2f} B  step {t * 1e3:8.1f} ms  "
              f"{S / t:10,.0f} tok/s  {flops / t / 1e12:7.1f} TFLOP/s", flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    table = "\n".join(
        ["| method | params | step (ms) | tokens/s | model TFLOP/s | MFU |",
         "|---|---|---|---|---|---|"]
        + [f"| {n} | {p / 1e9:.2f} B | {t * 1e3:.1f} | {tps:,.0f} | {tf:.1f} | "
           f"{tf / args.peak_tflops:.1%} |" for n, p, t, tps, tf in rows]
    )
    print(table)
    if args.write:
        import doc_tables

        device = torch.cuda.get_device_name(0) if cuda else "CPU"
        cmd = " ".join(["python benchmarks/bench_gpu_step.py", *sys.argv[1:]])
        doc_tables.write_section(
            "bench_gpu_step", f"Training step per method ({device})",
            f"One packed row of {S} tokens (two documents), forward + backward with the loss, "
            f"median of {args.reps} after a warm-up; {datetime.date.today()}; `{cmd}`.\n\n"
            f"{table}\n",
        )
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
