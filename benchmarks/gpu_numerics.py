"""bf16 numerics of every fast attention path on a GPU, against an fp64 reference.

Issue target: each fast path's error is no larger than twice that of plain bf16 SDPA on the same
shape. For each path, random bf16 inputs (batch 2, GQA 16 / 4 heads, D = 128, S = ``--seq``)
go through the fast path forward and backward (a random bf16 output gradient); the same inputs,
upcast to fp64, go through the plain torch tiles (``force_backend("torch_blockwise")``), the
package's reference engine. Reported: relative error ||fast - ref|| / ||ref|| of out, dq, dk, dv,
their maximum, and that maximum over the baseline's (plain causal SDPA in bf16 against fp64
causal attention on the same inputs).

Paths: plain causal on our Triton kernel; DCA on the fused Triton kernel and as three passes on
cuDNN / flash pieces (``ops/sdpa_tiles.py``); CoCA slack and strict (fused prologue + SDPA); a
context-parallel block (queries one block after the keys, the ring's off-diagonal call, and the
diagonal block) on Triton and on cuDNN pieces. DCA uses M = 1024, W = 256 so that all three
passes occur at S = 4096.

Usage (CUDA only)::

    python benchmarks/gpu_numerics.py --write      # docs/benchmarks.md, section gpu_numerics
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import doc_tables  # noqa: E402

from megatron_ext.ops import (  # noqa: E402
    attention_func,
    block_attention,
    coca_attn_func,
    dual_chunk_attn_func,
    force_backend,
)
from megatron_ext.ops.sdpa_tiles import force_engine  # noqa: E402
from megatron_ext.ops.triton import triton_attention  # noqa: E402

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _grads(fn: Fn, q, k, v, dout_seed: int, name=None, engine=None) -> list[torch.Tensor]:
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    with force_backend(name), force_engine(engine):
        out = fn(q, k, v)
        g = torch.Generator(device=out.device).manual_seed(dout_seed)
        dout = torch.randn(out.shape, generator=g, device=out.device).to(out.dtype)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return [out.detach(), dq, dk, dv]


def rel_errors(fast: Fn, ref: Fn, q, k, v, name=None, engine=None) -> list[float]:
    """[out, dq, dk, dv] relative errors of fast (bf16) against ref (fp64, torch tiles)."""
    got = _grads(fast, q, k, v, 1, name, engine)
    want = _grads(ref, q.double(), k.double(), v.double(), 1, "torch_blockwise")
    return [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, want)]


def _sdpa_causal(q, k, v):
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return o.transpose(1, 2)


def _attn(q, k, v):
    return attention_func(q, k, v, causal=True)[0]


def _block(offset: int) -> Fn:
    def run(q, k, v):
        pos = torch.arange(q.shape[1], device=q.device)
        return block_attention(q, k, v, q_positions=pos + offset, k_positions=pos)[0]

    return run


def cases(m: int, w: int, seq: int) -> list[tuple[str, Fn, Fn, str | None, str | None]]:
    """(name, fast fn, reference fn, forced backend of the fast run, SDPA engine)."""
    after = _block(seq)

    def dca(q, k, v):
        return dual_chunk_attn_func(q, k, v, chunk_size=m, local_size=w)

    def coca(form):
        return lambda q, k, v: coca_attn_func(q, k, v, form=form)

    return [
        ("plain causal, SDPA (baseline)", _sdpa_causal, _attn, None, None),
        ("plain causal, our Triton", lambda q, k, v: triton_attention(q, k, v)[0], _attn, None,
         None),
        ("DCA, fused Triton kernel", dca, dca, "triton", None),
        ("DCA, passes on cuDNN pieces", dca, dca, "sdpa", "cudnn"),
        ("DCA, passes on flash pieces", dca, dca, "sdpa", "flash"),
        ("CoCA slack (prologue + SDPA)", coca("slack"), coca("slack"), None, None),
        ("CoCA strict (prologue + SDPA)", coca("strict"), coca("strict"), None, None),
        ("CP block after the keys, Triton", after, after, "triton", None),
        ("CP block after the keys, cuDNN pieces", after, after, "sdpa", "cudnn"),
        ("CP diagonal block, Triton", _block(0), _block(0), "triton", None),
        ("CP diagonal block, cuDNN pieces", _block(0), _block(0), "sdpa", "cudnn"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dca-chunk-size", type=int, default=1024)
    ap.add_argument("--dca-local-size", type=int, default=256)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself "
                    "(TRITON_INTERPRET=1, tiny --seq; CUDA engines then fail and are reported)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_numerics.py needs CUDA (or --device cpu for a smoke run)")
    name_of = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    g = torch.Generator(device=dev).manual_seed(0)
    B, S, H, Hkv, D = 2, args.seq, 16, 4, 128
    q = torch.randn(B, S, H, D, generator=g, device=dev).bfloat16()
    k, v = (torch.randn(B, S, Hkv, D, generator=g, device=dev).bfloat16() for _ in range(2))
    rows, base = [], None
    plan = cases(args.dca_chunk_size, args.dca_local_size, args.seq)
    for name, fast, ref, forced, engine in plan:
        try:
            errs = rel_errors(fast, ref, q, k, v, forced, engine)
        except Exception as e:  # a path that cannot run here is reported, not fatal
            rows.append(f"| {name} | {type(e).__name__}: {str(e)[:80]} ||||||")
            print(rows[-1], flush=True)
            continue
        worst = max(errs)
        base = worst if base is None else base
        ok = "yes" if worst <= 2 * base else "**no**"
        rows.append(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs)
                    + f" | {worst:.2e} | {worst / base:.2f} | {ok} |")  # fmt: skip
        print(rows[-1], flush=True)
    doc_tables.publish("gpu_numerics", "GPU bf16 numerics (benchmarks/gpu_numerics.py)", [
        f"{doc_tables.stamp(name_of)}; bf16 inputs B={B}, S={S}, H={H}, Hkv={Hkv}, D={D}; DCA "
        f"M={args.dca_chunk_size}, W={args.dca_local_size}; reference fp64 torch tiles.",
        f"Command: `python benchmarks/gpu_numerics.py --seq {S}`",
        "",
        "| path | out | dq | dk | dv | max | / baseline | within 2x |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        *rows,
    ], args.write)  # fmt: skip

if __name__ == "__main__":
    main()
