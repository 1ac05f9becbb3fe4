"""Scorecard plans that blend synthetic passkey documents into training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_ext.config import load_config
from megatron_ext.eval.scorecard import _retrieval_blend, load_plan

MIX_PLAN = "configs/eval/scorecard_cpu_mix.yaml"


def _plan(tmp_path, **change) -> str:
    plan = yaml.safe_load(Path(MIX_PLAN).read_text()) | change
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


def test_committed_mix_plan_loads_and_its_blend_override_parses(tmp_path) -> None:
    plan = load_plan(MIX_PLAN)
    assert all(m["mix_retrieval"] for m in plan["models"].values())
    plan["retrieval_mix"]["docs"] = 3
    override = _retrieval_blend(plan, tmp_path)
    written = (tmp_path / "retrieval_mix.jsonl").read_text().splitlines()
    assert len(written) == 3
    cfg = load_config("configs/eval/rope_cpu.yaml", [override])
    assert [(b.path, b.weight) for b in cfg.data.blend] == [
        ("embedded", 0.75), (str(tmp_path / "retrieval_mix.jsonl"), 0.25)]


@pytest.mark.parametrize("mix, match", [
    ({"docs": 10, "weight": 0.2, "seed": 0}, "other than the evaluation seed 0"),
    ({"docs": 10, "weight": 0.2}, "other than the evaluation seed"),
    ({"docs": 10, "weight": 1.5, "seed": 1}, "0 < weight < 1"),
    ({"docs": 0, "weight": 0.2, "seed": 1}, "docs >= 1"),
])
def test_bad_mix_sections_are_refused(tmp_path, mix, match) -> None:
    with pytest.raises(ValueError, match=match):
        load_plan(_plan(tmp_path, retrieval_mix=mix))


def test_mix_model_without_section_is_refused(tmp_path) -> None:
    plan = yaml.safe_load(Path(MIX_PLAN).read_text())
    del plan["retrieval_mix"]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ValueError, match="sets mix_retrieval but the plan has no retrieval_mix"):
        load_plan(str(path))
