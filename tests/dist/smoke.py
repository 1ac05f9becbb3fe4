"""Entry point started by a real launcher in tests/test_dist.py.

Each rank initialises through megatron_ext.dist.init_distributed, all-reduces rank + 1 and
writes what it saw to OUT_DIR/rank<N>.json for the test to assert.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_ext.dist import destroy_distributed, init_distributed


def main() -> None:
    info = init_distributed(require_launcher=True)
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    out = {
        "launcher": info.launcher,
        "rank": info.rank,
        "world_size": info.world_size,
        "local_rank": info.local_rank,
        "backend": dist.get_backend(),
        "sum": t.item(),
        "argv": sys.argv[1:],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(os.environ["SMOKE_OUT_DIR"], f"rank{info.rank}.json"), "w") as f:
        json.dump(out, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
