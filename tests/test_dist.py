"""Distributed init: launcher env parsing (faked environments) and real 2-process launches.

The unit tests feed `read_launcher_env` the exact variables each launcher sets; the
`distributed` tests start tests/dist/smoke.py under torchrun, the deepspeed launcher, Open MPI's
mpirun and SLURM's srun (a one-node cluster from launch/slurm_local_cluster.sh) and assert
that both ranks agree on rank, world size, backend and an all-reduce.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
# real launches


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = launcher_free_env()
    env["SMOKE_OUT_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _check(tmp_path: Path, launcher: str) -> list[dict]:
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["launcher"] == launcher
        assert (res["rank"], res["world_size"], res["local_rank"]) == (r, 2, r)
        assert res["backend"] == "gloo"
        assert res["sum"] == 3.0
    return results


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.distributed
def test_torchrun_two_ranks(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(SMOKE)]
    _run(cmd, _clean_env(tmp_path))
    _check(tmp_path, "torchrun")


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI (mpirun) not installed")
def test_mpirun_two_ranks(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", MASTER_PORT=str(free_port()))
    _run(["mpirun", "-n", "2", "-x", "MASTER_PORT", "-x", "SMOKE_OUT_DIR", "-x", "PYTHONPATH",
          sys.executable, str(SMOKE)], env)
    _check(tmp_path, "openmpi")


@pytest.mark.distributed
def test_deepspeed_launcher_two_ranks(tmp_path: Path) -> None:
    ds = Path(sys.executable).with_name("deepspeed")
    if not ds.exists():
        pytest.fail("the deepspeed launcher script is missing from the environment")
    _run([str(ds), "--num_gpus", "2", "--master_port", str(free_port()), str(SMOKE)],
         _clean_env(tmp_path))
    results = _check(tmp_path, "deepspeed")
    assert all(any(a.startswith("--local_rank") for a in r["argv"]) for r in results)


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
          sys.executable, str(SMOKE)],
         _clean_env(tmp_path))
    _check(tmp_path, "slurm")
