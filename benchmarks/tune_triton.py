"""Tile-configuration sweep of our Triton attention kernels on a GPU (head dim 128, bf16).

Each candidate (fwd BLOCK_M x BLOCK_N; dq BLOCK_M_DQ x BLOCK_N_DQ; dk/dv BLOCK_M_KV query rows x
BLOCK_N_KV keys; forward warps / stages; backward warps / stages) replaces the shipped entry of
``ops/triton/interface._GPU_CONFIGS`` for one causal forward + backward at ``--seq`` (B=1,
H=16). A candidate is kept only if its output and gradients agree with PyTorch SDPA (relative
error < 2e-2); its median times (``triton.testing.do_bench``) are printed against SDPA cuDNN in
the same process. The table goes to docs/benchmarks.md (section ``tune_triton``) with --write;
the shipped entry is then chosen by hand from it (forward and backward separately).

Usage (CUDA only)::

    python benchmarks/tune_triton.py --seq 16384 --write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import doc_tables  # noqa: E402

from megatron_ext.ops.triton import interface, triton_attention  # noqa: E402

# (BM, BN, BM_DQ, BN_DQ, BM_KV, BN_KV, warps, stages, warps_bwd, stages_bwd)
CANDIDATES = [
    (128, 64, 128, 32, 16, 128, 8, 3, 8, 3),  # shipped
    (128, 128, 128, 32, 16, 128, 8, 3, 8, 3),
    (128, 64, 128, 32, 16, 128, 4, 3, 8, 3),
    (128, 128, 128, 32, 16, 128, 8, 2, 8, 3),
    (128, 64, 128, 64, 32, 128, 8, 3, 8, 2),
    (128, 64, 64, 64, 64, 64, 8, 3, 4, 2),
    (128, 64, 128, 32, 32, 64, 8, 3, 4, 3),
    (128, 64, 64, 32, 32, 128, 8, 3, 8, 3),
    (128, 64, 128, 64, 64, 128, 8, 3, 8, 2),
]


def _sdpa(q, k, v):
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return o.transpose(1, 2)


def _fwd_bwd_times(fn, q, k, v, dout) -> tuple[float, float, list[torch.Tensor]]:
    from triton.testing import do_bench

    fwd = do_bench(lambda: fn(q, k, v), warmup=10, rep=40, return_mode="median")
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    bwd = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                   warmup=10, rep=40, return_mode="median")  # fmt: skip
    return float(fwd), float(bwd), [out.detach(), *grads]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--budget-s", type=float, default=100.0, help="stop trying candidates after")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    S, H, D = args.seq, 16, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, S, H, D, generator=g, device=dev, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))  # fmt: skip
    dout = torch.randn(1, S, H, D, generator=g, device=dev, dtype=torch.bfloat16)
    flops = 4 * H * S * S * D / 2
    f0, b0, ref = _fwd_bwd_times(_sdpa, q, k, v, dout)
    rows = [f"| SDPA cuDNN (baseline) | {f0:.2f} | {b0:.2f} | {flops / f0 / 1e9:.0f} | "
            f"{2.5 * flops / b0 / 1e9:.0f} | — |"]  # fmt: skip
    print(rows[-1], flush=True)
    shipped = interface._GPU_CONFIGS[(128, True)]
    t_start = time.time()
    for cand in CANDIDATES:
        if time.time() - t_start > args.budget_s:
            rows.append(f"| {cand} | not tried (time budget) |||||")
            continue
        interface._GPU_CONFIGS[(128, True)] = cand
        try:
            f, b, got = _fwd_bwd_times(lambda q, k, v: triton_attention(q, k, v)[0], q, k, v, dout)
            err = max(float((a.float() - r.float()).norm() / r.float().norm())
                      for a, r in zip(got, ref))  # fmt: skip
            ok = "yes" if err < 2e-2 else f"**no ({err:.1e})**"
            rows.append(f"| {cand} | {f:.2f} | {b:.2f} | {flops / f / 1e9:.0f} | "
                        f"{2.5 * flops / b / 1e9:.0f} | {ok} |")  # fmt: skip
        except Exception as e:  # out of resources, compile error: reported, not fatal
            rows.append(f"| {cand} | {type(e).__name__}: {str(e)[:60]} |||||")
        finally:
            interface._GPU_CONFIGS[(128, True)] = shipped
        print(rows[-1], flush=True)
    doc_tables.publish("tune_triton", "Triton tile sweep (benchmarks/tune_triton.py)", [
        f"{doc_tables.stamp(torch.cuda.get_device_name(dev))}; bf16 causal B=1, S={S}, H={H}, "
        f"D={D}.",
        f"Command: `python benchmarks/tune_triton.py --seq {S}`",
        "",
        "Config = (BLOCK_M, BLOCK_N, BLOCK_M_DQ, BLOCK_N_DQ, BLOCK_M_KV, BLOCK_N_KV, warps, "
        "stages, warps_bwd, stages_bwd); first row shipped.",
        "",
        "| config | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s | matches SDPA |",
        "|---|---:|---:|---:|---:|---|",
        *rows,
    ], args.write)  # fmt: skip

if __name__ == "__main__":
    main()
