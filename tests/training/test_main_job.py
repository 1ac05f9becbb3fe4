"""The README's main job (`launch/run_local.sh`), shortened: every stage runs as a user runs it.

Four pretraining steps at 128 tokens (torchrun, CP=2), two continued steps at 512 with DCA
(deepspeed launcher, CP=2, ZeRO-2, weights from the first run), perplexity of both runs at 1x
and 4x, passkey, Hugging Face export. Asserted: exit status 0, each stage's files where the
script says they are, the continued run really started from the first run's weights, and the
perplexities are finite numbers written for both lengths. The figures of the full-length job
are in the README.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from train_utils import REPO, env
from utils import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_run_local_journey(tmp_path) -> None:
    out = tmp_path / "runs"
    e = env()
    e.update(STEPS1="4", STEPS2="2", OUT=str(out), MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(REPO / "launch" / "run_local.sh"), "--no-progress",
                           "--set", "data.max_documents=2"], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    first, second = out / "tiny", out / "tiny_long_dca"
    assert "continued pretraining from" in proc.stdout and str(first) in proc.stdout
    for run, ckpt in ((first, "step_00000004"), (second, "step_00000002")):
        assert (run / "checkpoints" / "latest").read_text().strip() == ckpt
        results = json.loads((run / "eval.json").read_text())
        assert [r["seq_length"] for r in results] == [128, 512]
        assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in results)
    assert json.loads((second / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    assert [r["cp_group"] for r in json.loads((second / "world.json").read_text())] == \
        [[0, 1], [0, 1]]
    assert (second / "passkey.json").is_file()
    assert (out / "tiny_long_dca_hf" / "config.json").is_file()
    assert "== done in" in proc.stdout
