"""The DeepSpeed path against the plain path and against one process.

- ZeRO 0, 1, 2 and 3 on 2 data-parallel ranks with gradient accumulation (2 micro-batches)
  each equal the plain AdamW path for 4 steps, loss and gradient norm to 1e-5 relative: the
  same AdamW maths on the same gradients, only partitioned, flattened and reduced in another
  order (fp32 rounding). ZeRO-3 with every layer recomputed in backward gives the same.
- Under the real `deepspeed` launcher, 2 ranks with context parallelism (CP=2, ZeRO-2) and
  with tensor parallelism (TP=2, ZeRO-1), with q/k layernorm (whose TP-partial gradients are
  summed in backward hooks), reproduce a single-process run's per-step losses to
  2e-5 relative (fp32: attention merged across ranks and vocabulary-parallel cross-entropy sum
  in another order) and the loss falls. The DeepSpeed JSON, world layout and a DeepSpeed
  checkpoint are written with the run; under CP=2 (data parallel size 1) the checkpoint holds
  two ZeRO optimizer partitions: ZeRO shards over the data x context group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_utils import TINY, deepspeed_launcher, losses, metrics, run_train, sets, tail
from utils import run_distributed

from megatron_ext.config import load_config

pytestmark = pytest.mark.distributed

STEPS = 12
# q/k layernorm: its gradients are partial on each TP rank and must be summed over the group
ARGS = [*TINY, *sets(train__steps=STEPS, train__lr=0.003, train__micro_batch_size=2,
                     attention__qk_norm="layernorm_pre_rope")]


def _zero_worker(rank: int, group, out: str) -> None:
    import os

    os.environ.setdefault("LOCAL_RANK", str(rank))  # DeepSpeed reads it to pick a device
    from megatron_ext.training.loop import train

    base = ["parallel.context_parallel_size=1", "data.max_documents=2", "data.seq_length=64",
            "train.steps=4", "train.grad_accum_steps=2", "train.micro_batch_size=2",
            "train.eval_batches=1", "train.warmup_steps=1", "train.lr=0.003"]
    results = {}
    runs = [("plain", []), *[(f"zero{s}", ["deepspeed.enabled=true", f"deepspeed.zero_stage={s}"])
                             for s in range(4)],
            ("zero3_recompute", ["deepspeed.enabled=true", "deepspeed.zero_stage=3",
                                 "train.activation_checkpointing=full"])]
    for name, extra in runs:
        cfg = load_config("configs/run/tiny.yaml",
                          [*base, *extra, f"train.out_dir={out}/{name}"])
        results[name] = train(cfg, progress=False)["losses"]
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps(results))


def test_zero_stages_equal_plain(tmp_path: Path) -> None:
    run_distributed(_zero_worker, 2, tmp_path, timeout=600, out=str(tmp_path))
    results = json.loads((tmp_path / "losses.json").read_text())
    ref = results.pop("plain")
    assert len(ref) == 4 and ref[-1] < ref[0]
    for name, got in results.items():
        assert got == pytest.approx(ref, rel=1e-5), name
    for name in ("zero0", "zero2"):
        ref_norms = [r["grad_norm"] for r in metrics(tmp_path / "plain")]
        got_norms = [r["grad_norm"] for r in metrics(tmp_path / name)]
        assert got_norms == pytest.approx(ref_norms, rel=1e-5), name
    ds = json.loads((tmp_path / "zero2" / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 2 * 2 * 2


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single") / "run"
    proc = run_train([*ARGS, "--set", f"train.out_dir={out}"])
    assert proc.returncode == 0, tail(proc)
    return losses(out)


@pytest.mark.parametrize("layout", [
    pytest.param({"parallel__context_parallel_size": 2, "deepspeed__zero_stage": 2}, id="cp2"),
    pytest.param({"parallel__tensor_parallel_size": 2, "deepspeed__zero_stage": 1}, id="tp2"),
])
def test_launcher_two_ranks_equal_one_process(single: list[float], tmp_path: Path,
                                              layout: dict) -> None:
    out = tmp_path / "run"
    proc = run_train([*ARGS, *sets(deepspeed__enabled="true", train__out_dir=out, **layout)],
                     launcher=deepspeed_launcher(2))
    assert proc.returncode == 0, tail(proc)
    got = losses(out)
    assert len(got) == STEPS
    assert got == pytest.approx(single, rel=2e-5)
    assert sum(got[-3:]) / 3 < got[0] - 0.5, got
    world = json.loads((out / "world.json").read_text())
    ck = out / "checkpoints" / f"step_{STEPS:08d}"
    optim = sorted(p.name for p in (ck / "engine").glob("zero_pp_rank_*_optim_states.pt"))
    if "parallel__context_parallel_size" in layout:
        assert [r["cp_group"] for r in world] == [[0, 1], [0, 1]]
        assert [r["dp_cp_group"] for r in world] == [[0, 1], [0, 1]]
        # DP = 1, yet ZeRO partitions the optimizer over the 2 context-parallel ranks
        assert optim == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    else:
        assert [r["tp_group"] for r in world] == [[0, 1], [0, 1]]
        assert [r["dp_cp_group"] for r in world] == [[0], [1]]
    assert "world layout (preflight)" in proc.stdout
    assert (ck / "engine").is_dir() and (ck / "model" / "megatron_ext.json").is_file()
