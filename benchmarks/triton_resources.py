"""Register, spill and shared-memory usage of the Triton attention kernels, without a GPU.

Compiles every kernel of ``megatron_ext/ops/triton`` ahead of time for a CUDA target (default
sm_90, H100/H200) with the tile configurations the launcher would pick, then reads the cubin's
resource usage with the ``cuobjdump`` that ships with triton. Pointer arguments are compiled as
16-byte aligned, as the JIT specialises them for torch allocations. A kernel that spills
("stack" > 0) or needs more shared memory than the device has (227 KiB on sm_90) will be slow
or fail to launch; this catches both on a CPU-only machine. Speed itself needs a GPU
(``benchmarks/bench_gpu.py``).

Usage::

    python benchmarks/triton_resources.py                    # bf16, D 64 and 128, sm_90
    python benchmarks/triton_resources.py --dtype fp32 --head-dims 64 --arch 80
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_ext.ops.triton import attention_bwd, attention_fwd, interface  # noqa: E402

INTS = {"Sq", "Sk", "H", "HKV", "q_offset", "window", "chunk_len", "q_vstride"}
FLOATS = {"qk_scale", "scale"}
VARIANTS = {  # name: (MODE, NV, WINDOW, HAS_DOC)
    "causal": (0, 1, False, False),
    "window+docs": (0, 1, True, True),
    "chunk": (1, 1, False, False),
    "dca": (1, 3, False, False),
}
KERNELS = {  # name: (kernel, config key of BLOCK_M, of BLOCK_N)
    "fwd": (attention_fwd._attn_fwd_kernel, "BLOCK_M", "BLOCK_N"),
    "dq": (attention_bwd._attn_bwd_dq_kernel, "BLOCK_M_DQ", "BLOCK_N_DQ"),
    "dkdv": (attention_bwd._attn_bwd_dkdv_kernel, "BLOCK_M_KV", "BLOCK_N_KV"),
}


def compile_kernel(fn, consts: dict, dtype: str, warps: int, stages: int, arch: int):
    """triton.compile of one specialisation; pointers 16-byte aligned like the JIT's."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:  # pointers: index tensors int32, statistics fp32, the rest in the input dtype
            sig[name] = {"DOCS": "*i32", "DOCE": "*i32", "LSE": "*fp32", "DELTA": "*fp32"}.get(
                name, f"*{dtype}"
            )
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n == "q_vstride"
             or sig[n].startswith("*")}  # fmt: skip
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": warps, "num_stages": stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def resources(kernel) -> str:
    """'regs / spill bytes / shared KiB' from the cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+)", res.stdout)
    regs, stack = (m.group(1), m.group(2)) if m else ("?", "?")
    return f"{regs} / {stack} / {kernel.metadata.shared // 1024}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = p.parse_args(argv)
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"sm_{args.arch}, {args.dtype}: registers / spill bytes / shared KiB per kernel")
    print("| D | variant | " + " | ".join(KERNELS) + " |")
    print("|---:|---|" + "---|" * len(KERNELS))
    for D in args.head_dims:
        q = torch.empty(0, 0, 0, D, dtype=tdt, device="meta")
        cfg = interface._gpu_config(q)
        for vname, (mode, nv, window, doc) in VARIANTS.items():
            cells = []
            for fn, bm, bn in KERNELS.values():
                consts = {
                    "D": D, "BLOCK_M": cfg[bm], "BLOCK_N": cfg[bn], "NV": nv, "MODE": mode,
                    "CAUSAL": True, "WINDOW": window, "HAS_DOC": doc, "F64": False,
                    "PREC": "ieee" if args.dtype == "fp32" else "tf32",
                }  # fmt: skip
                k = compile_kernel(fn, consts, args.dtype, cfg["num_warps"], cfg["num_stages"],
                                   args.arch)  # fmt: skip
                cells.append(resources(k))
            print(f"| {D} | {vname} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
