"""GPU attention benchmark: our Triton kernels, DCA and CoCA against SDPA flash / cuDNN (and
flash-attn when installed), forward and backward TFLOP/s and peak memory, at 4K..128K.

Rows (``--families``; each family is timed on the same shapes):

- causal: ``triton_attention``; ``attention_func`` (auto dispatch); torch SDPA with the flash and
  cuDNN backends forced; ``flash_attn_func`` when flash-attn is importable.
- dca: ``dual_chunk_attn_func`` (fused Triton kernel on CUDA; its time includes the four RoPE
  rotations); the three passes on PyTorch's fused kernels with lse (cuDNN or flash pieces,
  ``ops/sdpa_tiles.py``); and the torch pass-based path up to ``--dca-torch-max`` (much slower).
- cp: the context-parallel ring's diagonal block (``block_attention``, causal, with lse) on the
  Triton interval kernel and on cuDNN pieces.
- coca: ``coca_attn_func`` slack and strict (fused Triton prologue, then SDPA on CUDA).

FLOPs are the standard causal count for every row: forward ``4 * B * H * S^2 * D / 2``, backward
2.5x forward (flash-attention's convention; DCA computes exactly the causal pairs, CoCA adds only
O(S) prologue work). "ratio" is a row's forward+backward TFLOP/s over the best baseline
(SDPA flash, SDPA cuDNN, flash-attn) of the same S. Issue targets: CoCA >= 0.95, DCA >= 0.85.

Timing uses ``triton.testing.do_bench`` on CUDA (median, L2 flushed between runs) and a plain
median of ``--reps`` runs on CPU. Peak memory: ``max_memory_allocated`` over one forward+backward
minus the allocation before it (CUDA only).

Usage::

    python benchmarks/bench_gpu.py --quick          # CPU or GPU smoke run, prints only
    python benchmarks/bench_gpu.py --write          # S = 4K..128K, updates docs/benchmarks.md
    python benchmarks/bench_gpu.py --families causal --sizes 16384 --head-dim 128

``--write`` replaces the marker-delimited ``bench_gpu`` section of docs/benchmarks.md (with the
device name) and leaves the rest of the file alone.
"""

from __future__ import annotations

import argparse
import statistics
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
    block_attention,
    coca_attn_func,
    dual_chunk_attn_func,
)
from megatron_ext.ops.backend import choose_backend, force_backend, installed  # noqa: E402
from megatron_ext.ops.sdpa_tiles import force_engine  # noqa: E402
from megatron_ext.ops.triton import triton_attention, triton_available  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
FULL_SIZES = (4096, 8192, 16384, 32768, 65536, 131072)
QUICK_SIZES = (128, 256)
BASELINES = ("sdpa-flash", "sdpa-cudnn", "flash-attn")


@dataclass(frozen=True)
class Impl:
    """One benchmarked implementation: ``fn(inputs) -> out`` on inputs in ``layout``."""

    family: str
    name: str
    fn: Callable[[dict], torch.Tensor]
    layout: str = "bshd"  # "bshd" (ours) or "bhsd" (SDPA)
    needs_cuda: bool = False
    max_s: int | None = None


def _sdpa(backend_name: str) -> Callable[[dict], torch.Tensor]:
    def run(x: dict) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)

    return run


def _flash_attn(x: dict) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(x["q"], x["k"], x["v"], causal=True)


def _dca_torch(x: dict, m: int, w: int) -> torch.Tensor:
    with force_backend("torch_blockwise"):
        return dual_chunk_attn_func(x["q"], x["k"], x["v"], chunk_size=m, local_size=w)


def _dca_sdpa(x: dict, m: int, w: int, engine: str) -> torch.Tensor:
    """DCA's passes on PyTorch's fused kernels with the given engine (ops/sdpa_tiles.py)."""
    with force_backend("sdpa"), force_engine(engine):
        return dual_chunk_attn_func(x["q"], x["k"], x["v"], chunk_size=m, local_size=w)


def _cp_block(x: dict, backend: str) -> torch.Tensor:
    """The CP ring's diagonal (causal) block call, on the given interval backend."""
    pos = torch.arange(x["q"].shape[1], device=x["q"].device)
    with force_backend(backend), force_engine("cudnn" if backend == "sdpa" else None):
        return block_attention(x["q"], x["k"], x["v"], q_positions=pos, k_positions=pos)[0]


def build_impls(dca_m: int, dca_w: int, dca_torch_max: int) -> list[Impl]:
    """Every implementation this run may time (filtered later by device and family)."""
    try:
        import flash_attn  # noqa: F401

        has_fa = True
    except ImportError:
        has_fa = False
    impls = [
        Impl("causal", "triton_attention", lambda x: triton_attention(x["q"], x["k"], x["v"])[0],
             needs_cuda=True),
        Impl("causal", "attention_func(auto)", lambda x: attention_func(x["q"], x["k"], x["v"])[0]),
        Impl("causal", "sdpa-flash", _sdpa("FLASH_ATTENTION"), "bhsd", needs_cuda=True),
        Impl("causal", "sdpa-cudnn", _sdpa("CUDNN_ATTENTION"), "bhsd", needs_cuda=True),
        Impl("causal", "sdpa-math", _sdpa("MATH"), "bhsd", max_s=4096),
        Impl("dca", f"dca fused (M={dca_m}, W={dca_w})", lambda x: dual_chunk_attn_func(
            x["q"], x["k"], x["v"], chunk_size=dca_m, local_size=dca_w), needs_cuda=True),
        Impl("dca", "dca passes on cuDNN pieces", lambda x: _dca_sdpa(x, dca_m, dca_w, "cudnn"),
             needs_cuda=True),
        Impl("dca", "dca passes on flash pieces", lambda x: _dca_sdpa(x, dca_m, dca_w, "flash"),
             needs_cuda=True),
        Impl("dca", "dca torch passes", lambda x: _dca_torch(x, dca_m, dca_w),
             max_s=dca_torch_max),
        Impl("cp", "CP diagonal block, Triton", lambda x: _cp_block(x, "triton"),
             needs_cuda=True),
        Impl("cp", "CP diagonal block, cuDNN pieces", lambda x: _cp_block(x, "sdpa"),
             needs_cuda=True),
        Impl("coca", "coca slack", lambda x: coca_attn_func(x["q"], x["k"], x["v"])),
        Impl("coca", "coca strict", lambda x: coca_attn_func(x["q"], x["k"], x["v"],
                                                             form="strict")),
    ]  # fmt: skip
    if has_fa:
        impls.append(Impl("causal", "flash-attn", _flash_attn, needs_cuda=True))
    return impls


def causal_flops(B: int, H: int, S: int, D: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of causal attention: 4*B*H*S^2*D/2 and 2.5x that."""
    fwd = 4 * B * H * S * S * D / 2
    return fwd, 2.5 * fwd


def _inputs(S: int, B: int, H: int, D: int, dtype, device, layout: str) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    shape = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
    mk = lambda: torch.randn(shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    return {n: mk().requires_grad_() for n in ("q", "k", "v")}


def _bench(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure(impl: Impl, S: int, B: int, H: int, D: int, dtype, device, reps: int) -> dict:
    """Forward / backward time and peak memory of one implementation at one S."""
    x = _inputs(S, B, H, D, dtype, device, impl.layout)
    leaves = tuple(x.values())
    fwd_ms = _bench(lambda: impl.fn(x), device, reps)
    out = [impl.fn(x)]
    dout = torch.randn_like(out[0])
    bwd_ms = _bench(
        lambda: torch.autograd.grad(out[0], leaves, dout, retain_graph=True), device, reps
    )
    out.clear()  # free the graph before measuring memory
    mib = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.autograd.grad(impl.fn(x), leaves, dout)
        torch.cuda.synchronize()
        mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    f_fwd, f_bwd = causal_flops(B, H, S, D)
    return {
        "family": impl.family, "impl": impl.name, "S": S, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
        "fwd_tflops": f_fwd / fwd_ms / 1e9, "bwd_tflops": f_bwd / bwd_ms / 1e9,
        "tflops": (f_fwd + f_bwd) / (fwd_ms + bwd_ms) / 1e9, "mib": mib,
    }  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
    """ratio = fwd+bwd TFLOP/s over the best baseline row of the same S (None without one)."""
    for r in rows:
        best = [b["tflops"] for b in rows if b["S"] == r["S"] and b["impl"] in BASELINES]
        r["ratio"] = r["tflops"] / max(best) if best else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def table(rows: list[dict], device: torch.device, dtype, B: int, H: int, D: int, cmd: str) -> str:
    head = [
        f"{doc_tables.stamp(device_name(device))}; {str(dtype).replace('torch.', '')}, B={B}, "
        f"H={H}, D={D}; "
        f"attention_func(auto) = {select_backend_name(device, dtype, D)}.",
        f"Command: `{cmd}`",
        "",
        "FLOPs: causal count for every row (fwd 4·B·H·S²·D/2, bwd 2.5× fwd); ratio = fwd+bwd "
        "TFLOP/s / best of SDPA flash, SDPA cuDNN, flash-attn at the same S.",
        "",
        "| family | implementation | S | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s "
        "| fwd+bwd TFLOP/s | ratio | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    body = []
    for r in rows:
        if "error" in r:
            body.append(f"| {r['family']} | {r['impl']} | {r['S']} | {r['error']} |||||||")
            continue
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        mib = "—" if r["mib"] != r["mib"] else f"{r['mib']:.0f}"  # NaN: no CUDA statistics
        tf = [_num(r[k]) for k in ("fwd_tflops", "bwd_tflops", "tflops")]
        body.append(
            f"| {r['family']} | {r['impl']} | {r['S']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} "
            f"| {' | '.join(tf)} | {ratio} | {mib} |"
        )
    return "\n".join(head + body)


def _num(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def select_backend_name(device: torch.device, dtype, D: int) -> str:
    return choose_backend(device.type, dtype, D, "causal", installed())


def write_section(text: str) -> None:
    doc_tables.write_section("bench_gpu", "GPU attention (benchmarks/bench_gpu.py)", text, DOC)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"S in {QUICK_SIZES}, print only")
    p.add_argument("--sizes", type=int, nargs="*", help="override the sequence lengths")
    p.add_argument("--families", nargs="*", default=["causal", "dca", "cp", "coca"])
    p.add_argument("--head-dim", type=int, default=128, help="D; H = 2048 // D heads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dca-chunk-size", type=int, default=3072, help="M (Llama-2 ChunkLlama)")
    p.add_argument("--dca-local-size", type=int, default=512, help="W; C = M - W")
    p.add_argument("--dca-torch-max", type=int, default=16384, help="largest S for torch DCA")
    p.add_argument("--reps", type=int, default=3, help="timed runs per row on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, D = args.batch, args.head_dim
    H = max(1, 2048 // D)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    impls = [
        i
        for i in build_impls(args.dca_chunk_size, args.dca_local_size, args.dca_torch_max)
        if i.family in args.families and (device.type == "cuda" or not i.needs_cuda)
    ]
    if device.type == "cuda" and not triton_available():
        raise ValueError("device=cuda but triton is not importable; install triton")
    rows = []
    for S in sizes:
        for impl in impls:
            if impl.max_s is not None and impl.max_s < S:
                continue
            try:
                rows.append(measure(impl, S, B, H, D, dtype, device, args.reps))
            except Exception as e:  # OOM, missing backend, unsupported input: a row, not a crash
                msg = "OOM" if "out of memory" in str(e) else f"n/a ({type(e).__name__})"
                rows.append({"family": impl.family, "impl": impl.name, "S": S, "error": msg})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            r = rows[-1]
            print(f"{r['family']:7s} {r['impl']:34s} S={S:7d} "
                  + (r["error"] if "error" in r else
                     f"fwd {r['fwd_ms']:9.2f} ms  bwd {r['bwd_ms']:9.2f} ms  "
                     f"{_num(r['tflops']):>7s} TFLOP/s"), flush=True)  # fmt: skip
    add_ratios([r for r in rows if "error" not in r])
    cmd = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = table(rows, device, dtype, B, H, D, cmd.strip())
    print(text)
    if args.write and not args.quick:
        write_section(text)
        print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
