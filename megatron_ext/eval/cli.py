"""`python -m megatron_ext.eval`: evaluate a checkpoint on long-context tasks, write JSON.

    python -m megatron_ext.eval --checkpoint runs/rope/checkpoint \\
        --tasks passkey,niah,vt,cwe,ppl --lengths 512,1024,2048 \\
        [--set attention.variant=dca --set attention.dca.chunk_size=384 ...] --out results.json

The results file holds the resolved config, the command's arguments, the hardware, the wall
time, per task and length the scores (per depth for passkey and needles) and every sample's
prediction. It is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "parse_lengths", "write_json"]


def parse_lengths(text: str) -> list[int]:
    """'512,1024' -> [512, 1024]; each a positive integer."""
    out = []
    for part in text.split(","):
        try:
            n = int(part)
        except ValueError:
            raise ValueError(f"--lengths {text!r}: {part!r} is not an integer; expected e.g. "
                             "512,1024,2048") from None
        if n < 1:
            raise ValueError(f"--lengths {text!r}: {n} is not a positive length")
        out.append(n)
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--depths {text!r}: expected fractions like 0,0.5,1") from None


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Write `obj` as indented JSON to `path` atomically (temp file + rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_ext.eval",
                                description="Long-context evaluation of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--tasks", default="passkey,ppl",
                   help="comma-separated: passkey, niah, vt, cwe, fwe, ppl")
    p.add_argument("--lengths", required=True, help="comma-separated lengths in tokens")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override the stored run config")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--seed", type=int, default=0, help="data seed of the prompts")
    p.add_argument("--trials", type=int, default=10, help="samples per length (and depth)")
    p.add_argument("--depths", default=None, help="needle depths, e.g. 0,0.25,0.5,0.75,1")
    p.add_argument("--ppl-split", default="test", choices=("test", "dev"))
    p.add_argument("--ppl-protocols", default="truncation,sliding")
    p.add_argument("--ppl-stride", type=int, default=None, help="default: length // 2")
    p.add_argument("--ppl-windows", type=int, default=8, help="most sliding windows (0: all)")
    p.add_argument("--ppl-docs", type=int, default=None, help="first N held-out documents")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--engine", default="inference", choices=("inference", "forward"),
                   help="inference: the inference engine (cached decode, every method); "
                        "forward: full gpt_forward passes")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    """Everything `main` does except exiting: returns the results dict it wrote."""
    from megatron_ext.eval.model import load_eval_model
    from megatron_ext.eval.runner import hardware_info, run_eval
    from megatron_ext.eval.tasks import parse_tasks
    from megatron_ext.typed_yaml import to_dict

    tasks = parse_tasks(args.tasks)
    lengths = parse_lengths(args.lengths)
    depths = _floats(args.depths) if args.depths else None
    if args.trials < 1:
        raise ValueError(f"--trials {args.trials}; expected >= 1")
    ppl = {"split": args.ppl_split, "protocols": tuple(args.ppl_protocols.split(",")),
           "stride": args.ppl_stride, "max_windows": args.ppl_windows or None,
           "max_docs": args.ppl_docs}
    t0 = time.perf_counter()
    model = load_eval_model(args.checkpoint, args.overrides, device=args.device,
                            dtype=args.dtype, engine=args.engine)
    t_load = time.perf_counter() - t0
    ppl["tokenizer_path"] = model.config.data.tokenizer
    res = run_eval(model, tasks, lengths, seed=args.seed, trials=args.trials, depths=depths,
                   ppl=ppl, progress=not args.no_progress)
    ppl["protocols"] = list(ppl["protocols"])
    out = {
        "checkpoint": str(args.checkpoint), "overrides": list(args.overrides),
        "tasks_requested": tasks, "lengths": lengths, "seed": args.seed,
        "trials": args.trials, "depths": depths, "ppl_options": ppl,
        "config": to_dict(model.config), "hardware": hardware_info(),
        "device": str(model.device), "dtype": args.dtype, "engine": args.engine,
        "load_s": round(t_load, 3), "wall_time_s": round(time.perf_counter() - t0, 3),
        **res,
    }
    write_json(out, args.out)
    return out


def _table(res: dict) -> str:
    lines = []
    for task, by_len in res["tasks"].items():
        cells = []
        for n, v in by_len.items():
            if task == "ppl":
                cells.append(f"{n}: " + ", ".join(f"{p} {x['ppl']:.2f}" for p, x in v.items()))
            else:
                cells.append(f"{n}: {100 * v['score']:.0f}%")
        lines.append(f"{task:14s} " + " | ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import warnings

    for pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)
    import torch.distributed as dist

    args = build_parser().parse_args(argv)
    owned = not dist.is_initialized()  # tear down only what this call set up
    try:
        res = run(args)
    except ValueError as e:  # ConfigError, CheckpointError, LengthError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if owned and dist.is_initialized():
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
            dist.destroy_process_group()
    print(_table(res))
    print(f"wrote {args.out} ({res['wall_time_s']:.1f} s)")
