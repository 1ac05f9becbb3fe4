"""Held-out perplexity of a trained run at several sequence lengths.

`python -m megatron_ext.training.evaluate RUN_DIR --seq-lengths 128 512` loads the run's
resolved config and the weights of its latest checkpoint (or `--checkpoint DIR`) into one
process (any tensor-parallel size it was trained at: the distributed checkpoint reshards),
packs the held-out split at each length and reports the mean token loss and perplexity over
the first `--tokens` held-out tokens. The attention settings are the run's own (`--set` may
change them, e.g. to evaluate a RoPE run with DCA). Results are printed as a table and written
atomically to RUN_DIR/eval.json (one entry per length, replacing earlier entries for the same
length).

Protocol: the same text at every length: the held-out split is packed in stream order (not
shuffled), and the first `tokens // seq_length` sequences are scored, so every length sees the
same leading `--tokens` tokens cut into rows of its own length; documents keep their
boundaries; the loss is over every real token.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from megatron_ext.config import load_config, parse_override


def evaluate_run(run_dir: str | Path, seq_lengths: list[int], *, tokens: int = 8192,
                 checkpoint: str | Path | None = None, overrides: list[str] = ()
                 ) -> list[dict]:
    """[{seq_length, loss, ppl, tokens}] for the run's weights (single process).

    Initialises a world of one process and Megatron's parallel state if none exists.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ext.checkpoint import load_megatron_checkpoint
    from megatron_ext.data.dataset import build_datasets
    from megatron_ext.dist import device, init_distributed
    from megatron_ext.specs import build_gpt_model
    from megatron_ext.training.checkpointing import resolve_checkpoint, verify_checkpoint
    from megatron_ext.training.loop import micro_loss
    from megatron_ext.training.preflight import check_vocab

    run_dir = Path(run_dir)
    source = resolve_checkpoint(checkpoint or run_dir)
    verify_checkpoint(source)
    for text in overrides:
        parse_override(text)  # fail early on a malformed --set
    if not dist.is_initialized():
        init_distributed()
    own = not ps.model_parallel_is_initialized()
    if own:
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
    dev = device()
    results = []
    try:
        for seq in seq_lengths:
            cfg = load_config(source / "config.yaml",
                              [*overrides, f"data.seq_length={seq}",
                               "parallel.tensor_parallel_size=1",
                               "parallel.context_parallel_size=1"])
            data = build_datasets(cfg.data, seed=cfg.train.seed, progress=False)
            vocab = check_vocab(cfg, data.vocab_size)
            torch.manual_seed(0)
            model = build_gpt_model(cfg.model, cfg.attention, vocab_size=vocab,
                                    dtype=cfg.train.dtype,
                                    use_cpu_initialization=dev.type == "cpu")
            model.to(dev)
            load_megatron_checkpoint(model, source / "model")
            model.eval()
            total, count = 0.0, 0
            with torch.no_grad():
                n = min(len(data.eval), max(tokens // seq, 1))
                if n == 0:
                    raise ValueError(f"no held-out sequence of {seq} tokens")
                for start in range(0, n, cfg.train.micro_batch_size):
                    idx = range(start, min(start + cfg.train.micro_batch_size, n))
                    batch = {k: torch.stack([data.eval.sample(i)[k] for i in idx])
                             for k in ("tokens", "labels", "doc_ids", "positions")}
                    s, c = micro_loss(model, batch, mask_documents=cfg.attention.mask_documents,
                                      cp=None, device=dev)
                    total += s.item()
                    count += int(c.item())
            loss = total / count
            results.append({"seq_length": seq, "loss": loss, "ppl": math.exp(min(loss, 50)),
                            "tokens": count, "variant": cfg.attention.variant,
                            "checkpoint": str(source)})
    finally:
        if own:
            ps.destroy_model_parallel()
    return results


def write_results(run_dir: Path, results: list[dict]) -> Path:
    """Merge `results` into run_dir/eval.json (atomic replace), keyed by sequence length."""
    from megatron_ext.training.observe import write_json

    path = run_dir / "eval.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    keep = [r for r in old if r["seq_length"] not in {x["seq_length"] for x in results}]
    merged = sorted(keep + results, key=lambda r: r["seq_length"])
    write_json(path, merged)
    return path


def main(argv: list[str] | None = None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description="Held-out perplexity of a run at several lengths.")
    p.add_argument("run_dir", help="a training run directory (train.out_dir)")
    p.add_argument("--seq-lengths", type=int, nargs="+", required=True)
    p.add_argument("--tokens", type=int, default=8192,
                   help="held-out tokens scored at every length")
    p.add_argument("--checkpoint", default=None, help="a checkpoint other than the latest")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override the run's config")
    args = p.parse_args(argv)
    from megatron_ext.dist import destroy_distributed

    try:
        results = evaluate_run(args.run_dir, args.seq_lengths, tokens=args.tokens,
                               checkpoint=args.checkpoint, overrides=args.overrides)
    finally:
        destroy_distributed()
    path = write_results(Path(args.run_dir), results)
    print(f"held-out perplexity of {results[0]['checkpoint']} ({results[0]['variant']}):")
    for r in results:
        print(f"  {r['seq_length']:>6} tokens: loss {r['loss']:.4f}  ppl {r['ppl']:8.2f}  "
              f"({r['tokens']:,} tokens)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
