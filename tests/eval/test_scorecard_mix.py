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
    mix_file = tmp_path / "retrieval_mix_s1_n3_L512.jsonl"
    written = mix_file.read_text().splitlines()
    assert len(written) == 3
    cfg = load_config("configs/eval/rope_cpu.yaml", [override])
    assert [(b.path, b.weight) for b in cfg.data.blend] == [
        ("embedded", 0.75), (str(mix_file), 0.25)]


def test_full_plan_mixes_longer_documents_for_the_continued_run(tmp_path) -> None:
    """The continued-pretraining model trains on passkey documents up to its own 4T length;
    each length has its own file, and the plan's models use the lengths they train at."""
    from megatron_ext.data.tokenizer import load_tokenizer

    plan = load_plan("configs/eval/scorecard_cpu.yaml")
    assert plan["models"]["rope_cp4x"]["mix_length"] == 4 * plan["train_length"]
    plan["retrieval_mix"]["docs"] = 4
    short = _retrieval_blend(plan, tmp_path)
    long = _retrieval_blend(plan, tmp_path, 1024)
    assert short != long
    tok = load_tokenizer(None)
    for length in (256, 1024):
        path = tmp_path / f"retrieval_mix_s1_n4_L{length}.jsonl"
        assert str(path) in (long if length == 1024 else short)
        n = [len(tok.encode(yaml.safe_load(line)["text"]).ids)
             for line in path.read_text().splitlines()]
        assert len(n) == 4 and max(n) <= length + 2 and min(n) >= 128 - 2
    for name in ("rope", "hybrid", "coca", "rope_cp4x"):
        cfg = load_config(plan["models"][name]["config"])
        want = plan["models"][name].get("mix_length", plan["train_length"])
        assert cfg.data.seq_length == want == cfg.model.max_position_embeddings


@pytest.mark.parametrize("ml", [16, "long", 1024.5])
def test_bad_mix_length_is_refused(tmp_path, ml) -> None:
    plan = yaml.safe_load(Path("configs/eval/scorecard_cpu.yaml").read_text())
    plan["models"]["rope_cp4x"]["mix_length"] = ml
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ValueError, match="mix_length"):
        load_plan(str(path))


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


@pytest.mark.parametrize("plan_file", ["configs/eval/scorecard_cpu_quick.yaml", MIX_PLAN])
def test_quick_plans_keep_their_recipe(plan_file) -> None:
    """The quick plans were run at T = 512 (batch 8, hybrid window 128, continued run at 2048);
    their overrides pin that recipe on the shared model configs, which moved to T = 256."""
    from megatron_ext.eval.scorecard import _train_set

    plan = load_plan(plan_file)
    assert plan["train_length"] == 512
    for name, m in plan["models"].items():
        cfg = load_config(m["config"], [s for s in _train_set(m) if not s.startswith("data.blend")])
        want = 2048 if name == "rope_cp4x" else 512
        assert cfg.data.seq_length == cfg.model.max_position_embeddings == want
        assert cfg.train.steps == (60 if name == "rope_cp4x" else 250)
        if name != "rope_cp4x":
            assert cfg.train.micro_batch_size == 8
        if name == "hybrid":
            assert cfg.attention.hybrid.window == 128
