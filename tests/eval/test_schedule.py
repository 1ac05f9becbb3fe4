"""The scorecard's job runner: dependencies, slot limit, threads, failures; the plan's jobs.

Jobs are real subprocesses that record when they ran; the checks are on those records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_ext.eval.schedule import Job, run_jobs, threads_per_slot
from megatron_ext.eval.scorecard import eval_jobs, load_plan, train_jobs

_RECORD = ("import json, os, sys, time; t0 = time.time(); time.sleep(float(sys.argv[2])); "
           "json.dump({'start': t0, 'end': time.time(), "
           "'threads': os.environ['OMP_NUM_THREADS']}, open(sys.argv[1], 'w'))")


def _job(tmp: Path, name: str, sleep: float = 0.3, **kw) -> Job:
    return Job(name, [sys.executable, "-c", _RECORD, str(tmp / f"{name}.json"), str(sleep)],
               tmp / "logs" / f"{name}.log", **kw)


def _times(tmp: Path, name: str) -> dict:
    return json.loads((tmp / f"{name}.json").read_text())


def test_dependencies_and_slot_limit(tmp_path: Path) -> None:
    walls: dict[str, float] = {}
    jobs = [_job(tmp_path, "a", done=lambda s: walls.__setitem__("a", s)),
            _job(tmp_path, "b"),
            _job(tmp_path, "c", after={"a"}),
            _job(tmp_path, "d", after={"a", "b"}),
            _job(tmp_path, "wide", ranks=2, after={"c"})]
    run_jobs(jobs, slots=2)
    t = {j.name: _times(tmp_path, j.name) for j in jobs}
    assert t["c"]["start"] >= t["a"]["end"]
    assert t["d"]["start"] >= max(t["a"]["end"], t["b"]["end"])
    assert t["wide"]["start"] >= max(t["c"]["end"], t["d"]["end"])  # needs both slots
    # never more than two at once
    for name, r in t.items():
        overlap = [n for n, o in t.items() if o["start"] < r["start"] < o["end"] and n != name]
        assert len(overlap) <= 1, (name, overlap)
    assert walls["a"] >= 0.3
    assert {r["threads"] for r in t.values()} == {str(threads_per_slot(2))}


def test_narrow_jobs_fill_a_free_slot_before_a_wide_job(tmp_path: Path) -> None:
    jobs = [_job(tmp_path, "a", sleep=0.8), _job(tmp_path, "wide", ranks=2),
            _job(tmp_path, "b", sleep=0.2), _job(tmp_path, "c", sleep=0.2)]
    run_jobs(jobs, slots=2)
    t = {j.name: _times(tmp_path, j.name) for j in jobs}
    assert t["b"]["start"] < t["a"]["end"] and t["c"]["start"] < t["a"]["end"]  # backfilled
    assert t["wide"]["start"] >= max(t["a"]["end"], t["b"]["end"], t["c"]["end"])


def test_a_wide_job_runs_alone_when_slots_are_fewer(tmp_path: Path) -> None:
    run_jobs([_job(tmp_path, "cp", ranks=4)], slots=2)
    assert (tmp_path / "cp.json").exists()


def test_failure_stops_dependents_and_names_the_log(tmp_path: Path) -> None:
    bad = Job("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log")
    with pytest.raises(RuntimeError, match=r"status 3; see .*bad\.log"):
        run_jobs([bad, _job(tmp_path, "after_bad", after={"bad"})], slots=2)
    assert not (tmp_path / "after_bad.json").exists()


@pytest.mark.parametrize("jobs,match", [
    ([("x", {"y"})], "unknown jobs"),
    ([("x", {"y"}), ("y", {"x"})], "circular"),
    ([("x", set()), ("x", set())], "duplicate"),
])
def test_bad_job_graphs_are_refused(tmp_path: Path, jobs, match) -> None:
    with pytest.raises(ValueError, match=match):
        run_jobs([_job(tmp_path, n, after=a) for n, a in jobs])
    assert not list(tmp_path.glob("*.json"))  # nothing started


def test_threads_respect_a_smaller_omp_setting(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_per_slot(1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_per_slot(10**6) == 1


def test_committed_plan_orders_continued_pretraining_after_its_base(tmp_path: Path) -> None:
    plan = load_plan("configs/eval/scorecard_cpu.yaml")
    plan["runs_dir"] = str(tmp_path / "runs")
    for m in plan["models"].values():
        m.pop("mix_retrieval", None)  # the blend file is not needed to build the commands
        m["train_set"] = [*m.get("train_set", []),
                          *([f"train.init_from={tmp_path / 'runs' / 'rope'}"]
                            if "cp4x" in m["config"] else [])]
    train = {j.name: j for j in train_jobs(plan)}
    assert set(train) == {f"train {n}" for n in plan["models"]}
    assert train["train rope_cp4x"].after == {"train rope"}
    assert train["train rope_cp4x"].ranks == 2
    assert all(not j.after for n, j in train.items() if n != "train rope_cp4x")
    evals = {j.name: j for j in eval_jobs(plan, trained={"rope", "hybrid"})}
    assert evals["eval dca"].after == {"train rope"}
    assert evals["eval coca"].after == set()  # its model is not being trained in this run
