"""Run the scorecard's training and evaluation commands side by side on a few CPU cores.

Each `Job` is one command (a training run or one method's evaluation) that needs `ranks` slots
and may wait for other jobs (an evaluation for its model's training, a continued-pretraining run
for its base model). `run_jobs` starts, in list order, every job whose dependencies are done
and whose ranks fit in the free slots (a wide job waits while narrower ones fill single free
slots, and starts once enough are free), and gives each rank `threads` intra-op threads
(``OMP_NUM_THREADS``), so two single-threaded jobs on two cores do not fight over them. A
failed job stops the run: the jobs already started finish, nothing new starts, and the error
names the failed command and its log.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Job", "run_jobs", "threads_per_slot"]


@dataclass
class Job:
    """One command of the scorecard.

    Attributes:
        name: unique key, e.g. "train rope" or "eval dca".
        cmd: the argv to run.
        log: file that receives its stdout and stderr.
        ranks: slots it occupies (processes it starts).
        after: names of the jobs that must succeed first.
        done: called with the wall time in seconds when it succeeds.
    """

    name: str
    cmd: list[str]
    log: Path
    ranks: int = 1
    after: set[str] = field(default_factory=set)
    done: Callable[[float], None] | None = None


def threads_per_slot(slots: int) -> int:
    """Intra-op threads per rank when ``slots`` ranks share the machine's cores (never more than
    an ``OMP_NUM_THREADS`` the caller set)."""
    n = max(1, (os.cpu_count() or 1) // max(1, slots))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(n, int(cap)) if cap.isdigit() and int(cap) > 0 else n


def run_jobs(jobs: list[Job], slots: int = 1, *, poll_s: float = 0.2) -> None:
    """Run ``jobs`` respecting ``after``, at most ``slots`` ranks at a time.

    A job wider than ``slots`` runs alone. Raises ValueError for unknown or circular
    dependencies and duplicate names (before anything starts), RuntimeError for a failed job.
    """
    if slots < 1:
        raise ValueError(f"slots={slots}; expected >= 1")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate job names in {names}")
    for j in jobs:
        unknown = j.after - set(names)
        if unknown:
            raise ValueError(f"job {j.name!r} waits for unknown jobs {sorted(unknown)}")
    _check_acyclic(jobs)
    threads = threads_per_slot(slots)
    pending = list(jobs)
    running: dict[str, tuple[Job, subprocess.Popen, float, object]] = {}
    finished: set[str] = set()
    failed: list[str] = []
    try:
        while pending or running:
            used = sum(j.ranks for j, *_ in running.values())
            ready = [] if failed else [j for j in pending if j.after <= finished]
            for j in ready:
                if used and used + j.ranks > slots:
                    continue  # a narrower job later in the list may fit meanwhile
                pending.remove(j)
                running[j.name] = (j, *_start(j, threads))
                used += j.ranks
            if not running:
                break  # all done, or a failure left nothing to wait for
            time.sleep(poll_s)
            for name, (j, proc, t0, f) in list(running.items()):
                if proc.poll() is None:
                    continue
                f.close()
                del running[name]
                if proc.returncode:
                    failed.append(f"{' '.join(j.cmd)} failed with status {proc.returncode}; "
                                  f"see {j.log}")
                    continue
                finished.add(name)
                if j.done is not None:
                    j.done(time.perf_counter() - t0)
    finally:
        for _, proc, _, f in running.values():  # only after an exception in this process
            proc.terminate()
            proc.wait()
            f.close()
    if failed:
        raise RuntimeError("; ".join(failed))


def _start(j: Job, threads: int) -> tuple[subprocess.Popen, float, object]:
    j.log.parent.mkdir(parents=True, exist_ok=True)
    f = open(j.log, "w", encoding="utf-8")  # noqa: SIM115 - closed when the job ends
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(j.cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, t0, f


def _check_acyclic(jobs: list[Job]) -> None:
    after = {j.name: j.after for j in jobs}
    done: set[str] = set()
    while len(done) < len(after):
        ready = [n for n, deps in after.items() if n not in done and deps <= done]
        if not ready:
            raise ValueError(f"circular job dependencies among {sorted(set(after) - done)}")
        done.update(ready)
