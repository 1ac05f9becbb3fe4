"""Train a Megatron-core GPT on packed documents: `python -m megatron_ext.train --config RUN.yaml`.

The loop lives in `megatron_ext.training` (docs/training.md): config and out_dir checks before
any file is written, Megatron tensor x context x data parallel state, the plain AdamW path or a
DeepSpeed engine (`deepspeed.enabled`, ZeRO 0-3), atomic checkpoints every
`train.save_interval` steps and at the end, exact `--resume`, continued pretraining from
`train.init_from`, held-out evaluation, tensorboard + metrics.jsonl.

Works under torchrun, the deepspeed launcher, srun and mpirun (see megatron_ext/dist.py), or as
a single process. Exit status: 0 done, 2 refused config or checkpoint (nothing written),
3 stopped on a non-finite loss or gradient (the last good checkpoint is intact).
"""

from __future__ import annotations

import argparse
import sys
import warnings

_KNOWN_HARMLESS_WARNINGS = (
    r"Transformer Engine and Apex are not installed",  # local (non-TE) Megatron modules
    r"Apex is not installed",
    r"full scope is deprecated",  # megatron-core 0.16 default cuda_graph_scope
    r"`torch.distributed.all_gather_into_tensor` is deprecated",  # called inside DeepSpeed
)


def _quiet_known_warnings() -> None:
    for pattern in _KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


# before megatron is imported, and at every import: megatron-core's checkpoint writer re-imports
# this module in a child process
_quiet_known_warnings()

from megatron_ext.checkpoint import CheckpointError  # noqa: E402
from megatron_ext.config import (  # noqa: E402
    ConfigError,
    RunConfig,
    add_config_args,
    config_from_args,
)
from megatron_ext.dist import destroy_distributed, init_distributed  # noqa: E402
from megatron_ext.training.loop import TrainingStoppedError  # noqa: E402
from megatron_ext.training.loop import train as _train_loop  # noqa: E402
from megatron_ext.training.schedule import lr_at  # noqa: E402


def train(cfg: RunConfig, *, progress: bool = True, resume: bool = False,
          overwrite: bool = False) -> dict:
    """Run the configured training (see `megatron_ext.training.loop.train`)."""
    return _train_loop(cfg, progress=progress, resume=resume, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    _quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the environment is what counts")
    parser.add_argument("--no-progress", action="store_true", help="log lines, no progress bars")
    parser.add_argument("--resume", action="store_true",
                        help="continue train.out_dir from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty train.out_dir")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    init_distributed(cfg.parallel.backend)
    code = 0
    try:
        train(cfg, progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, CheckpointError) as e:
        kind = "config error" if isinstance(e, ConfigError) else "checkpoint error"
        print(f"{kind}: {e}", file=sys.stderr, flush=True)
        code = 2
    except TrainingStoppedError as e:
        print(str(e), file=sys.stderr, flush=True)
        code = 3
    finally:
        destroy_distributed()
    if code:
        raise SystemExit(code)


__all__ = ["lr_at", "main", "train"]

if __name__ == "__main__":
    main()
