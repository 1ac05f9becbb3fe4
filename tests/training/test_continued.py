"""Continued pretraining: a short RoPE run continued at 2-4x the length with another method.

A RoPE model is trained for 20 steps at 64 tokens (in this process, a world of one gloo rank).
Each continuation loads only its weights (`train.init_from`) and must start from what the
source learned: its first-step loss is at least 0.5 nat below a fresh model's (ln 4096 = 8.3)
for DCA, a Cohere2-style hybrid and RoPE with a 4x base and YaRN at 256 tokens, and for CoCA at
128 (CoCA's t projection is the RoPE key projection, so nothing is re-initialised). The
256-token DCA run also uses the sequence-length warm-up (64 -> 256 over 2 steps) and must log
those lengths. Refused switches (another width, leaving CoCA) fail before anything is
written, naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from train_utils import metrics

from megatron_ext.config import ConfigError, load_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

ROOT = Path(__file__).resolve().parents[2]
BASE = ["parallel.context_parallel_size=1", "data.max_documents=2", "train.eval_batches=1",
        "train.micro_batch_size=4", "train.warmup_steps=2"]


def _train(*overrides: str):
    from megatron_ext.training.loop import train

    return train(load_config(ROOT / "configs/run/tiny.yaml", [*BASE, *overrides]),
                 progress=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from megatron_ext.dist import init_distributed

    init_distributed()
    out = tmp_path_factory.mktemp("rope") / "run"
    result = _train(f"train.out_dir={out}", "data.seq_length=64", "train.steps=20",
                    "train.lr=0.003")
    yield out, result
    dist.destroy_process_group()


@pytest.mark.parametrize("switch, seq", [
    pytest.param(["attention.variant=dca",
                  "attention.dca={chunk_size: 48, local_size: 8, "
                  "original_max_position_embeddings: 64}",
                  "train.seq_warmup_start=64", "train.seq_warmup_steps=2"], 256, id="dca-4x"),
    pytest.param(["attention.variant=hybrid",
                  "attention.hybrid={preset: cohere2, nope_every: 2, window: 32}"], 256,
                 id="hybrid-4x"),
    pytest.param(["attention.variant=coca"], 128, id="coca-2x"),
    pytest.param(["attention.rope_theta=40000.0",
                  "attention.rope_scaling={type: yarn, factor: 4.0, "
                  "original_max_position_embeddings: 64}"], 256, id="rope-yarn-base-4x"),
])
def test_continue_with_method_switch(source, tmp_path: Path, switch: list[str], seq: int
                                     ) -> None:
    src, src_result = source
    assert src_result["losses"][-1] < 7.5, src_result["losses"]
    out = tmp_path / "run"
    result = _train(f"train.out_dir={out}", f"train.init_from={src}", f"data.seq_length={seq}",
                    "train.steps=3", "train.lr=0.001", *switch)
    first = result["losses"][0]
    assert first < 8.3 - 0.5, result["losses"]
    rows = metrics(out)
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)  # finite, one per step
    if "train.seq_warmup_steps=2" in switch:
        assert [r["seq_length"] for r in rows] == [64, 160, 256]
    else:
        assert {r["seq_length"] for r in rows} == {seq}
    saved = load_config(out / "config.yaml")
    assert saved.train.init_from == str(src) and saved.data.seq_length == seq


def test_refused_switches(source, tmp_path: Path) -> None:
    src, _ = source
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"model.hidden_size: checkpoint 64, this run 128"):
        _train(f"train.out_dir={out}", f"train.init_from={src}", "model.hidden_size=128")
    assert not out.exists()
    coca = tmp_path / "coca"
    _train(f"train.out_dir={coca}", f"train.init_from={src}", "attention.variant=coca",
           "data.seq_length=64", "train.steps=1")
    with pytest.raises(ConfigError, match=r"attention.variant: checkpoint 'coca', this run "
                                          r"'rope' \(CoCA's t projection is not a key"):
        _train(f"train.out_dir={out}", f"train.init_from={coca}")
    assert not out.exists()
