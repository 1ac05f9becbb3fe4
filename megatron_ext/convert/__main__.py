"""`python -m megatron_ext.convert hf2mcore|mcore2hf|ds2hf --src DIR --dst DIR [...]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_ext.convert.errors import ConversionError
from megatron_ext.convert.hf_config import FAMILIES


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_ext.convert",
        description="Convert checkpoints: Hugging Face <-> megatron_ext, DeepSpeed -> HF.")
    parser.add_argument("direction", choices=("hf2mcore", "mcore2hf", "ds2hf"))
    parser.add_argument("--src", required=True, help="source directory")
    parser.add_argument("--dst", required=True, help="new output directory")
    parser.add_argument("--tp", type=int, default=1,
                        help="hf2mcore: tensor-parallel size recorded in the run config")
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="mcore2hf/ds2hf: HF family (megatron_ext = bundled code)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="mcore2hf/ds2hf: weight dtype (default: the source's / float32)")
    parser.add_argument("--config", default=None, help="ds2hf: run YAML of the DeepSpeed run")
    parser.add_argument("--tag", default=None, help="ds2hf: DeepSpeed checkpoint tag")
    parser.add_argument("--max-shard-size", type=int, default=2 * 1024**3,
                        help="mcore2hf: bytes per safetensors shard")
    args = parser.parse_args(argv)
    try:
        if args.direction == "hf2mcore":
            from megatron_ext.convert.api import hf_to_mcore

            out = hf_to_mcore(args.src, args.dst, tp=args.tp)
        elif args.direction == "mcore2hf":
            from megatron_ext.convert.api import mcore_to_hf

            out = mcore_to_hf(args.src, args.dst, family=args.family, dtype=args.dtype,
                              max_shard_bytes=args.max_shard_size)
        else:
            from megatron_ext.convert.deepspeed_io import ds_to_hf

            out = ds_to_hf(args.src, args.dst, config=args.config, tag=args.tag,
                           family=args.family, dtype=args.dtype)
    except ConversionError as e:
        sys.exit(f"conversion error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
