"""Every refused input is refused before the run writes a file, with a message naming the key.

Config-only refusals are checked on `check_config` / `check_out_dir` / `check_vocab` directly
(the message must name the key and the valid choice). Refusals that need the data, a
checkpoint or a process group run the real `train()` in this process (a world of one gloo
rank) and then assert that `train.out_dir` was not created or is byte-for-byte unchanged.
The schedules are checked against their closed forms; `--overwrite` replaces an earlier run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_ext.checkpoint import CheckpointError
from megatron_ext.config import ConfigError, TrainConfig, load_config
from megatron_ext.training.preflight import check_config, check_out_dir, check_vocab
from megatron_ext.training.schedule import lr_at, seq_length_at

RUN = "configs/run/tiny.yaml"
ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str):
    return load_config(ROOT / RUN, list(overrides))


@pytest.mark.parametrize("overrides, world, match", [
    pytest.param(["data.seq_length=130"], 2,
                 r"parallel.context_parallel_size=2 \(zigzag layout\).*data.seq_length=130.*"
                 r"use 128 or 132", id="cp-does-not-divide-seq"),
    pytest.param(["parallel.context_parallel_size=1", "parallel.tensor_parallel_size=2"], 3,
                 r"world size 3 is not divisible by parallel.tensor_parallel_size=2",
                 id="world-vs-tp"),
    pytest.param(["parallel.cp_algorithm=a2a", "parallel.context_parallel_size=4"], 4,
                 r"parallel.cp_algorithm='a2a'.*4 query heads and 2 KV heads.*'ring'",
                 id="a2a-heads"),
    pytest.param(["attention.variant=hybrid",
                  "attention.hybrid={preset: cohere2, nope_every: 2, window: 128}"], 2,
                 r"attention.hybrid.window=128 >= data.seq_length=128.*full attention",
                 id="window-covers-sequence"),
    pytest.param(["attention.variant=hybrid",
                  "attention.hybrid={preset: llama4, nope_every: 2, chunk: 200}"], 2,
                 r"attention.hybrid.chunk=200 >= data.seq_length=128", id="chunk-covers-sequence"),
    pytest.param(["attention.variant=dca", "attention.dca={chunk_size: 128, local_size: 16}"], 2,
                 r"attention.dca.chunk_size=128 >= data.seq_length=128.*plain RoPE",
                 id="dca-chunk-covers-sequence"),
    pytest.param(["attention.variant=longheads"], 2, r"inference-only", id="longheads"),
    pytest.param(["train.dtype=fp16"], 2, r"train.dtype='fp16'.*deepspeed.enabled=true",
                 id="fp16-without-loss-scaling"),
    pytest.param(["train.dtype=fp16", "deepspeed.enabled=true"], 2, r"needs a CUDA device",
                 id="fp16-on-cpu"),
    pytest.param(["train.seq_warmup_start=256", "train.seq_warmup_steps=4"], 2,
                 r"train.seq_warmup_start=256 > data.seq_length=128", id="warmup-too-long"),
])
def test_check_config_refuses(overrides: list[str], world: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_config(_cfg(*overrides), world)


def test_heads_not_divisible_by_tp_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not divisible by "
                                          r"parallel.tensor_parallel_size=3"):
        _cfg("parallel.tensor_parallel_size=3")


def test_valid_config_passes() -> None:
    check_config(_cfg(), 2)
    check_config(_cfg("parallel.context_parallel_size=1", "parallel.tensor_parallel_size=2"), 4)


def test_vocab() -> None:
    with pytest.raises(ConfigError, match=r"model.vocab_size=100 is smaller than the "
                                          r"tokenizer's vocabulary \(4096\)"):
        check_vocab(_cfg("model.vocab_size=100"), 4096)
    assert check_vocab(_cfg(), 4096) == 4096
    assert check_vocab(_cfg("model.vocab_size=5000"), 4096) == 5000
    with pytest.raises(ConfigError, match=r"model.vocab_size=4097 is not divisible"):
        check_vocab(_cfg("model.vocab_size=4097", "parallel.tensor_parallel_size=2"), 4096)


def test_out_dir_modes(tmp_path: Path) -> None:
    assert check_out_dir(tmp_path / "new", resume=False, overwrite=False) == "new"
    assert check_out_dir(tmp_path, resume=False, overwrite=False) == "new"  # empty
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"is not empty.*--resume.*--overwrite"):
        check_out_dir(tmp_path, resume=False, overwrite=False)
    assert check_out_dir(tmp_path, resume=False, overwrite=True) == "overwrite"
    with pytest.raises(ConfigError, match=r"--resume: .* has no checkpoint"):
        check_out_dir(tmp_path, resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="exclude each other"):
        check_out_dir(tmp_path, resume=True, overwrite=True)


def test_schedules() -> None:
    t = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(s, t) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, t) == pytest.approx(1.0)
    assert lr_at(6, t) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, t) == pytest.approx(0.1)
    w = TrainConfig(steps=10, seq_warmup_start=32, seq_warmup_steps=4)
    assert [seq_length_at(s, w, 128, 4) for s in range(6)] == [32, 56, 80, 104, 128, 128]
    assert seq_length_at(3, TrainConfig(), 128, 4) == 128


@pytest.fixture
def world_of_one():
    from megatron_ext.dist import init_distributed

    init_distributed()
    yield
    dist.destroy_process_group()


def _train(*overrides: str, **kw):
    from megatron_ext.training.loop import train

    return train(_cfg("parallel.context_parallel_size=1", "data.max_documents=2",
                      "data.seq_length=64", *overrides), progress=False, **kw)


def test_refusals_write_nothing(world_of_one, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"model.vocab_size=100 is smaller"):
        _train(f"train.out_dir={out}", "model.vocab_size=100")
    assert not out.exists()
    with pytest.raises(CheckpointError, match=r"does not exist"):
        _train(f"train.out_dir={out}", f"train.init_from={tmp_path / 'nowhere'}")
    assert not out.exists()
    # an earlier run's directory: refused without --resume / --overwrite, config.yaml kept
    out.mkdir()
    (out / "config.yaml").write_text("earlier run\n")
    with pytest.raises(ConfigError, match=r"is not empty"):
        _train(f"train.out_dir={out}")
    with pytest.raises(ConfigError, match=r"has no checkpoint"):
        _train(f"train.out_dir={out}", resume=True)
    assert (out / "config.yaml").read_text() == "earlier run\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_overwrite_replaces_an_earlier_run(world_of_one, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    (out / "old_subdir").mkdir()
    result = _train(f"train.out_dir={out}", "train.steps=2", "train.eval_batches=1",
                    overwrite=True)
    assert len(result["losses"]) == 2
    assert not (out / "old_subdir").exists()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"loss": 1.0' not in rows[0]
    assert load_config(out / "config.yaml").train.steps == 2
