"""Distributed init: launcher env parsing (faked environments) and real 2-process launches.

The unit tests feed `read_launcher_env` the exact variables each launcher sets; the
`distributed` tests start tests/dist/smoke.py through the scripts in launch/ (torchrun, the
deepspeed launcher, Open MPI's mpirun as root, sbatch + srun on a one-node cluster from
launch/slurm_local_cluster.sh), from a directory outside the checkout, and assert the exact
rank, world size, local rank, backend, the all-reduced sum (1 + 2 = 3) and the arguments each
rank received. Two-node runs are simulated on one machine: two torchrun agents with
`--nnodes 2`, and two deepspeed launchers sharing a hostfile with `--no_ssh`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from utils import free_port, launcher_free_env

from megatron_ext.dist import (
    LauncherEnvError,
    expand_hostlist,
    pick_backend,
    read_launcher_env,
)

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "dist" / "smoke.py"


def test_torchrun_env() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "node0", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
    info = read_launcher_env(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size,
            info.master_addr, info.master_port) == ("torchrun", 3, 4, 1, 2, "node0", 1234)


def test_deepspeed_env() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "CUDA_VISIBLE_DEVICES": "0,1"}
    info = read_launcher_env(env)
    assert (info.launcher, info.rank, info.local_world_size) == ("deepspeed", 1, 2)


def test_torchrun_wins_over_slurm() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a",
           "MASTER_PORT": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    assert read_launcher_env(env).rank == 1


def test_slurm_env() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "4321",
           "SLURM_TASKS_PER_NODE": "2(x4)"}
    info = read_launcher_env(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size,
            info.master_addr, info.master_port) == ("slurm", 5, 8, 1, 2, "gpu07", 29500 + 321)
    env["MASTER_ADDR"], env["MASTER_PORT"] = "head", "777"
    info = read_launcher_env(env)
    assert (info.master_addr, info.master_port) == ("head", 777)


def test_openmpi_env() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    info = read_launcher_env(env)
    # two nodes and no MASTER_ADDR: left empty for init_distributed to ask mpi4py
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.master_addr) == (
        "openmpi", 2, 4, 0, "")
    env["OMPI_COMM_WORLD_LOCAL_SIZE"] = "4"
    assert read_launcher_env(env).master_addr == "127.0.0.1"


def test_pmi_env() -> None:
    info = read_launcher_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("pmi", 1, 2, 1)


def test_no_launcher() -> None:
    info = read_launcher_env({})
    assert (info.launcher, info.rank, info.world_size) == ("single", 0, 1)
    with pytest.raises(LauncherEnvError, match=r"no launcher environment recognised: expected "
                       r"one of RANK/WORLD_SIZE/.*SLURM_PROCID.*OMPI_COMM_WORLD_RANK"):
        read_launcher_env({}, require_launcher=True)


@pytest.mark.parametrize(
    "env, match",
    [
        pytest.param({"RANK": "0"}, r"env environment is incomplete: missing WORLD_SIZE, "
                     r"LOCAL_RANK, MASTER_ADDR, MASTER_PORT", id="torch-partial"),
        pytest.param({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a",
                      "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "1", "LOCAL_WORLD_SIZE": "1"}
                     | {"RANK": "x"}, r"RANK='x' is not an integer", id="not-int"),
        pytest.param({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
                     r"SLURM environment is incomplete: missing SLURM_LOCALID", id="slurm-partial"),
        pytest.param({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
                     r"missing SLURM_JOB_NODELIST \(or MASTER_ADDR\)", id="slurm-nodelist"),
        pytest.param({"OMPI_COMM_WORLD_RANK": "0"},
                     r"Open MPI environment is incomplete: missing OMPI_COMM_WORLD_SIZE, "
                     r"OMPI_COMM_WORLD_LOCAL_RANK", id="ompi-partial"),
        pytest.param({"PMI_RANK": "0"}, r"missing PMI_SIZE", id="pmi-partial"),
    ],
)
def test_env_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(LauncherEnvError, match=match):
        read_launcher_env(env)


def test_expand_hostlist() -> None:
    assert expand_hostlist("n1") == ["n1"]
    assert expand_hostlist("gpu-a[01-03,07],gpu-b5") == [
        "gpu-a01", "gpu-a02", "gpu-a03", "gpu-a07", "gpu-b5"]
    assert expand_hostlist("x[9-11]-ib") == ["x9-ib", "x10-ib", "x11-ib"]


def test_pick_backend() -> None:
    assert pick_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match=r"backend='mpi'; expected 'auto', 'gloo' or 'nccl'"):
        pick_backend("mpi")


# ---------------------------------------------------------------------------------------------
# real launches, through the scripts in launch/, started from a directory outside the checkout


LAUNCH = REPO / "launch"


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = launcher_free_env()
    for key in ("MEGATRON_EXT_HOME", "ENTRY", "CONFIG", "HOSTFILE", "LAUNCHER", "NGPU", "NPROC",
                "NNODES", "NODE_RANK", "NP"):
        env.pop(key, None)
    env["SMOKE_OUT_DIR"] = str(tmp_path)
    env["ENTRY"] = "smoke"  # tests/dist/smoke.py, run as `python -m smoke` by every launcher
    env["PYTHONPATH"] = str(SMOKE.parent) + os.pathsep + str(REPO)
    env["MASTER_PORT"] = str(free_port())
    env.update(extra)
    return env


def _elsewhere(tmp_path: Path) -> Path:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return cwd


def _check(tmp_path: Path, launcher: str, local_ranks: tuple[int, int] = (0, 1),
           config: bool = True) -> list[dict]:
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["launcher"] == launcher
        assert (res["rank"], res["world_size"], res["local_rank"]) == (r, 2, local_ranks[r])
        assert res["backend"] == "gloo"
        assert res["sum"] == 3.0
        if config:  # what the launcher script passes on, with the checkout's default config
            assert res["argv"][-2:] == ["--config", str(REPO / "configs/run/tiny.yaml")]
    return results


def _run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _run_nodes(cmd: list[str], envs: list[dict[str, str]], cwd: Path) -> None:
    """Start one launcher per simulated node at once; all must exit 0."""
    procs = [subprocess.Popen(cmd, env=e, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for e in envs]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {i} of {cmd} failed:\n{out[-3000:]}"


@pytest.mark.distributed
def test_torchrun_two_ranks(tmp_path: Path) -> None:
    _run(["bash", str(LAUNCH / "torchrun.sh")], _clean_env(tmp_path, NPROC="2"),
         cwd=_elsewhere(tmp_path))
    _check(tmp_path, "torchrun")


@pytest.mark.distributed
def test_torchrun_two_nodes_simulated(tmp_path: Path) -> None:
    """Two torchrun agents with --nnodes 2 (static rendezvous at node 0), one rank each."""
    port = str(free_port())
    envs = [_clean_env(tmp_path, NNODES="2", NPROC="1", NODE_RANK=str(i),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for i in range(2)]
    _run_nodes(["bash", str(LAUNCH / "torchrun.sh")], envs, _elsewhere(tmp_path))
    _check(tmp_path, "torchrun", local_ranks=(0, 0))


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI (mpirun) not installed")
def test_mpirun_two_ranks(tmp_path: Path) -> None:
    # launcher_free_env drops every OMPI_* variable: launch/mpirun.sh must allow root itself
    assert os.geteuid() != 0 or "OMPI_ALLOW_RUN_AS_ROOT" not in _clean_env(tmp_path)
    _run(["bash", str(LAUNCH / "mpirun.sh")], _clean_env(tmp_path, NP="2"),
         cwd=_elsewhere(tmp_path))
    _check(tmp_path, "openmpi")


@pytest.mark.distributed
def test_deepspeed_launcher_two_ranks(tmp_path: Path) -> None:
    env = _clean_env(tmp_path, NGPU="2")
    del env["OMP_NUM_THREADS"]  # the deepspeed launcher does not set it: launch/deepspeed.sh must
    _run(["bash", str(LAUNCH / "deepspeed.sh")], env, cwd=_elsewhere(tmp_path))
    results = _check(tmp_path, "deepspeed")
    assert all(any(a.startswith("--local_rank") for a in r["argv"]) for r in results)
    assert [(r["omp_num_threads"], r["torch_threads"]) for r in results] == [("1", 1)] * 2


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_launcher_two_nodes_no_ssh(tmp_path: Path) -> None:
    """The deepspeed launcher's multi-node path: one hostfile, one launcher per node with
    --no_ssh --node_rank, rendezvous at node 0."""
    cwd = _elsewhere(tmp_path)
    (cwd / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    envs = [_clean_env(tmp_path, HOSTFILE="hostfile", NODE_RANK=str(i),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for i in range(2)]
    _run_nodes(["bash", str(LAUNCH / "deepspeed.sh")], envs, cwd)
    _check(tmp_path, "deepspeed", local_ranks=(0, 0))


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("srun") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mix", "alloc"))


@pytest.mark.distributed
@pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster (launch/slurm_local_cluster.sh)")
def test_srun_two_ranks(tmp_path: Path) -> None:
    # --mpi=none: our init needs only SLURM's own variables, no PMI/MPI
    _run(["srun", "-n", "2", "--overcommit", "--mpi=none", "--kill-on-bad-exit=1",
          sys.executable, str(SMOKE)], _clean_env(tmp_path))
    _check(tmp_path, "slurm", config=False)


@pytest.mark.distributed
@pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster (launch/slurm_local_cluster.sh)")
def test_sbatch_from_another_directory(tmp_path: Path) -> None:
    """sbatch runs a spooled copy of launch/slurm.sbatch; it must still find the checkout."""
    cwd = _elsewhere(tmp_path)
    job = _run(["sbatch", "--parsable", "--overcommit", "-o", "job.out",
                str(LAUNCH / "slurm.sbatch")], _clean_env(tmp_path), cwd=cwd).strip()
    deadline = time.monotonic() + 240
    while True:  # poll ourselves: `sbatch --wait` sleeps up to 30 s between its own polls
        info = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                              text=True).stdout
        state = info.split("JobState=")[1].split()[0] if "JobState=" in info else "UNKNOWN"
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            break
        assert time.monotonic() < deadline, f"job {job} still {state} after 240 s"
        time.sleep(0.5)
    log = (cwd / "job.out").read_text() if (cwd / "job.out").exists() else ""
    assert state == "COMPLETED" and "ExitCode=0:0" in info, f"job {job}: {state}\n{log[-3000:]}"
    _check(tmp_path, "slurm")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster (launch/slurm_local_cluster.sh)")
def test_deepspeed_launcher_slurm(tmp_path: Path) -> None:
    """Inside an allocation, LAUNCHER=slurm: deepspeed uses no ssh, it starts ranks with srun."""
    out = _run(["salloc", "-n", "2", "--overcommit", "bash", str(LAUNCH / "deepspeed.sh")],
               _clean_env(tmp_path, LAUNCHER="slurm", NGPU="2"), cwd=_elsewhere(tmp_path))
    assert "cmd = srun -n 2" in out
    _check(tmp_path, "slurm")
