"""Generate text from a checkpoint: ``python -m megatron_ext.generate``.

    python -m megatron_ext.generate --checkpoint runs/tiny/checkpoint --prompt "Once upon" \
        --max-new-tokens 64 --set attention.variant=dca \
        --set "attention.dca={chunk_size: 768, local_size: 128}"

``--checkpoint`` takes a checkpoint directory or a run directory with a ``latest`` pointer;
``--set section.key=value`` overrides the stored run config (this is how a training-free method
is switched on); ``inference.*`` keys set the sampling defaults. A progress bar shows prefill
tokens/s; the peak memory is printed at the end. Design: docs/inference.md.

Context-parallel prefill (the prompt sharded over ranks, the KV cache on every rank; rank 0
prints the text):

    torchrun --nproc-per-node 2 -m megatron_ext.generate --context-parallel 2 \
        --checkpoint runs/tiny/checkpoint --prompt-file book.txt --set parallel.cp_layout=zigzag
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_ext.generate",
                                description="Generate from a megatron_ext checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory, or run directory with a 'latest' pointer")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file whose whole text is the prompt")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default inference.max_new_tokens)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="1 = off")
    p.add_argument("--prefill-chunk-size", type=int, default=None,
                   help="prompt tokens per prefill step")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="ranks that share the prompt's prefill (launch N ranks, e.g. torchrun "
                        "--nproc-per-node N); default 1")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override the run config (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from megatron_ext.checkpoint import CheckpointError
    from megatron_ext.config import ConfigError
    from megatron_ext.dist import is_main
    from megatron_ext.inference import load_model

    try:
        if args.prompt_file is not None:
            try:
                with open(args.prompt_file, encoding="utf-8") as f:
                    prompt = f.read()
            except OSError as e:
                raise ValueError(f"--prompt-file {args.prompt_file!r}: {e.strerror}") from e
        else:
            prompt = args.prompt
        m = load_model(args.checkpoint, args.overrides, device=args.device, dtype=args.dtype,
                       context_parallel=args.context_parallel)
        text = m.generate(
            prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, prefill_chunk_size=args.prefill_chunk_size,
            seed=args.seed, progress=is_main(),
        )[0]  # fmt: skip
    except (CheckpointError, ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}" if is_main() else 1) from None
    if is_main():
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
