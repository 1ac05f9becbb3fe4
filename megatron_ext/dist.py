"""Launcher-agnostic distributed initialisation: the only module that reads launcher env vars.

Recognised launchers, in order of precedence:

- torchrun, the `deepspeed` launcher, any env:// launcher: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT (+ LOCAL_WORLD_SIZE or LOCAL_SIZE);
- SLURM `srun` (no ssh, no MPI needed): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
  SLURM_JOB_NODELIST (its first host is the master), SLURM_JOB_ID (picks the port);
- Open MPI `mpirun`: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE (the master address
  comes from mpi4py when MASTER_ADDR is unset on several nodes);
- MPICH / Intel MPI: PMI_RANK, PMI_SIZE, MPI_LOCALRANKID.

torchrun inside an `srun` task wins over SLURM (its variables are the ones that describe the
process). With no launcher at all, `init_distributed()` starts a world of one process (so
`python -m megatron_ext.train` just works); a *partial* environment (say RANK without
WORLD_SIZE) is an error naming the missing variables. Backend: NCCL when CUDA is available,
gloo otherwise.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


class LauncherEnvError(RuntimeError):
    """The launcher environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as read from the launcher's environment."""

    launcher: str
    """'torchrun', 'deepspeed', 'env', 'slurm', 'openmpi', 'pmi' or 'single'."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _ints(env: Mapping[str, str], names: list[str], launcher: str) -> list[int]:
    missing = [n for n in names if n not in env]
    if missing:
        raise LauncherEnvError(
            f"{launcher} environment is incomplete: missing {', '.join(missing)} "
            f"(found {', '.join(n for n in names if n in env)})"
        )
    out = []
    for n in names:
        try:
            out.append(int(env[n]))
        except ValueError as e:
            raise LauncherEnvError(f"{n}={env[n]!r} is not an integer") from e
    return out


def expand_hostlist(spec: str) -> list[str]:
    """Expand a SLURM host list such as 'gpu-a[01-03,07],gpu-b5' into host names."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", spec):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(i).zfill(width)}{suffix}")
    return hosts


def _slurm_local_size(env: Mapping[str, str], world: int) -> int:
    if "SLURM_NTASKS_PER_NODE" in env:
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0].split(",")[0])
    if "SLURM_TASKS_PER_NODE" in env:  # e.g. "2(x3),1"
        return int(env["SLURM_TASKS_PER_NODE"].split("(")[0].split(",")[0])
    return world


NO_LAUNCHER_MESSAGE = (
    "no launcher environment recognised: expected one of "
    "RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun, deepspeed), "
    "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST (srun), "
    "OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE/OMPI_COMM_WORLD_LOCAL_RANK (mpirun), "
    "PMI_RANK/PMI_SIZE (MPICH)"
)


def read_launcher_env(
    env: Mapping[str, str] | None = None, *, require_launcher: bool = False
) -> LaunchEnv:
    """Parse the launcher environment (default: os.environ) without touching torch.distributed.

    With no launcher variables this describes a single process, unless `require_launcher`, in
    which case it raises LauncherEnvError listing what each launcher would have set.
    """
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))

    torch_keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]
    if any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        missing = [k for k in torch_keys if k not in env]
        if missing:
            raise LauncherEnvError(
                f"{launcher} environment is incomplete: missing {', '.join(missing)} "
                f"(an env:// launch needs all of {', '.join(torch_keys)})"
            )
        rank, world, local = _ints(env, ["RANK", "WORLD_SIZE", "LOCAL_RANK"], launcher)
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
        return LaunchEnv(launcher, rank, world, local, local_world, env["MASTER_ADDR"], port)

    if "SLURM_PROCID" in env:
        rank, world, local = _ints(env, ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"], "SLURM")
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST"))
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = expand_hostlist(nodelist)[0]
        else:
            raise LauncherEnvError(
                "SLURM environment is incomplete: missing SLURM_JOB_NODELIST (or MASTER_ADDR)"
            )
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            port = DEFAULT_PORT + int(env["SLURM_JOB_ID"]) % 1000
        return LaunchEnv("slurm", rank, world, local, _slurm_local_size(env, world), addr, port)

    if "OMPI_COMM_WORLD_RANK" in env:
        names = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"]
        rank, world, local = _ints(env, names, "Open MPI")
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world))
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_world == world else "")
        return LaunchEnv("openmpi", rank, world, local, local_world, addr, port)

    if "PMI_RANK" in env:
        rank, world = _ints(env, ["PMI_RANK", "PMI_SIZE"], "PMI (MPICH / Intel MPI)")
        local = int(env.get("MPI_LOCALRANKID", rank))
        local_world = int(env.get("MPI_LOCALNRANKS", world))
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_world == world else "")
        return LaunchEnv("pmi", rank, world, local, local_world, addr, port)

    if require_launcher:
        raise LauncherEnvError(NO_LAUNCHER_MESSAGE)
    return LaunchEnv("single", 0, 1, 0, 1, "127.0.0.1", port)


def _mpi_master_addr() -> str:
    """Rank 0's host name, broadcast over MPI (multi-node mpirun without MASTER_ADDR)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LauncherEnvError(
            "multi-node mpirun needs MASTER_ADDR (export it with `mpirun -x MASTER_ADDR=...`) "
            "or mpi4py installed (pip install 'megatron-ext[mpi]')"
        ) from e
    return MPI.COMM_WORLD.bcast(socket.gethostname() if MPI.COMM_WORLD.Get_rank() == 0 else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_backend(backend: str = "auto") -> str:
    """'auto' -> 'nccl' with CUDA, else 'gloo'. Raise on an unknown or unavailable backend."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}; expected 'auto', 'gloo' or 'nccl'")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA; this machine has none (use 'gloo' or 'auto')")
    return backend


def init_distributed(
    backend: str = "auto", timeout_s: float = 600.0, *, require_launcher: bool = False
) -> LaunchEnv:
    """Initialise torch.distributed from whatever launcher started this process.

    Sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for libraries that read them
    (DeepSpeed, Megatron), selects the CUDA device `local_rank` when CUDA is used, and returns
    the parsed launch environment. Calling it twice is a no-op returning the same information.
    """
    info = read_launcher_env(require_launcher=require_launcher)
    if info.launcher in ("openmpi", "pmi") and not info.master_addr:
        info = LaunchEnv(info.launcher, info.rank, info.world_size, info.local_rank,
                         info.local_world_size, _mpi_master_addr(), info.master_port)
    if info.launcher == "single" and "MASTER_PORT" not in os.environ:
        info = LaunchEnv("single", 0, 1, 0, 1, "127.0.0.1", _free_port())
    backend = pick_backend(backend)
    for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size),
                       ("LOCAL_RANK", info.local_rank), ("MASTER_ADDR", info.master_addr),
                       ("MASTER_PORT", info.master_port)):
        os.environ[key] = str(value)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return info


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def print0(*args: object, **kwargs: object) -> None:
    """print() on global rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)  # type: ignore[call-overload]


def device() -> torch.device:
    """This rank's compute device."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "LaunchEnv", "LauncherEnvError", "destroy_distributed", "device", "expand_hostlist",
    "get_rank", "get_world_size", "init_distributed", "is_main", "pick_backend", "print0",
    "read_launcher_env",
]
