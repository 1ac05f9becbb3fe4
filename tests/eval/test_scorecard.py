"""The scorecard renderer against results produced by the real eval CLI.

A tiny checkpoint is evaluated by `python -m megatron_ext.eval`'s `main` for two methods (the
plain model and a dynamic-NTK override); `render` must put exactly those numbers, formatted,
into the markdown tables and draw one heat map per method plus the perplexity plot. Plan
checks refuse a method naming an unknown model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_ext.eval.cli import main
from megatron_ext.eval.scorecard import load_plan, render


def test_render_tables_match_results(checkpoint: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    methods = {"base": {"model": "m"},
               "ntk": {"model": "m", "set": ["attention.rope_scaling={type: dynamic, factor: "
                                             "2.0, original_max_position_embeddings: 128}"]}}
    for name, m in methods.items():
        main(["--checkpoint", str(checkpoint), "--tasks", "passkey,ppl", "--lengths", "128,256",
              "--trials", "1", "--depths", "0,1", "--ppl-docs", "1", "--ppl-windows", "1",
              "--out", str(runs / "results" / f"{name}.json"), "--no-progress",
              *[a for s in m.get("set", []) for a in ("--set", s)]])
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({
        "train_length": 128, "multiples": [1, 2], "runs_dir": str(runs), "seed": 0,
        "trials": 1, "depths": [0.0, 1.0], "tasks": ["passkey", "ppl"],
        "retrieval_mix": {"docs": 5, "weight": 0.5, "seed": 3},
        "models": {"m": {"config": "unused.yaml", "mix_retrieval": True}}, "methods": methods}))
    plan = load_plan(plan_file)
    plan["_path"] = str(plan_file)
    md = render(plan, tmp_path / "docs" / "scorecard.md")
    text = md.read_text()
    for name in methods:
        res = json.loads((runs / "results" / f"{name}.json").read_text())
        ppl = [res["tasks"]["ppl"][n]["truncation"]["ppl"] for n in ("128", "256")]
        pk = [res["tasks"]["passkey"][n]["score"] for n in ("128", "256")]
        assert f"| {name} | {ppl[0]:.1f} | {ppl[1]:.1f} |" in text
        assert f"| {name} | {100 * pk[0]:.0f} | {100 * pk[1]:.0f} |" in text
        assert (md.parent / "scorecard" / f"passkey_{name}.png").stat().st_size > 1000
    assert (md.parent / "scorecard" / "ppl_vs_length.png").stat().st_size > 1000
    assert (md.parent / "scorecard" / "passkey_digits_vs_length.png").stat().st_size > 1000
    assert "(scorecard/passkey_digits_vs_length.png)" in text
    assert "| hybrid | — | — | — | — | not run |" in text
    assert ("**Trained with synthetic retrieval:** 50% of the training rows of the models "
            "m (128-128 tokens) were passkey documents") in text


def test_plan_with_unknown_model_is_refused(tmp_path: Path):
    f = tmp_path / "plan.yaml"
    f.write_text(yaml.safe_dump({"train_length": 1, "multiples": [1], "runs_dir": "r",
                                 "seed": 0, "trials": 1, "depths": [0], "tasks": ["ppl"],
                                 "models": {"a": {}}, "methods": {"x": {"model": "b"}}}))
    with pytest.raises(ValueError, match="method 'x' uses model 'b'"):
        load_plan(f)


@pytest.mark.parametrize("in_dist,pk,ratio,want", [
    (1.0, 0.95, 1.05, "met"),
    (1.0, 0.95, 1.20, "missed: perplexity at 16× is 1.20× its 1× value"),
    (1.0, 0.40, 1.00, "missed: passkey falls from 100% at 1× to 40% at 32×"),
    (0.50, 0.25, 1.00, "missed: the base model reaches only 50% at 1×, so 95% at 32× is out of "
                       "reach; at 32× it keeps 50% of its 1× score"),
    (0.0, 0.0, 0.9, "missed: exact-match passkey is 0% already at 1×"),
    (0.5, 0.6, None, "perplexity not measured at 16×"),
])
def test_target_outcome_wording(in_dist, pk, ratio, want):
    from megatron_ext.eval.scorecard import _target_outcome

    got = _target_outcome(in_dist, pk, ratio)
    assert got.startswith(want) or f"; {want}" in got, got


@pytest.mark.parametrize("in_dist,pk,ratio,want", [
    (0.8, 0.1, 1.0, "collapses in passkey, as expected (80% at 1×, 10% at 32×)"),
    (0.0, 0.0, 1.5, "collapses in perplexity, as expected"),
    (0.0, 0.0, 0.9, "no collapse to show"),
    (0.8, 0.7, 1.0, "does not collapse"),
])
def test_control_outcome_wording(in_dist, pk, ratio, want):
    from megatron_ext.eval.scorecard import _control_outcome

    assert _control_outcome(in_dist, pk, ratio).startswith(want)
