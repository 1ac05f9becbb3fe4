#!/usr/bin/env bash
# Start (or stop: `stop`) a one-node SLURM cluster on this machine, for trying the srun path and
# for the srun test. Needs root and Debian's slurm-wlm (installed here if missing). The node gets
# this machine's CPUs; no systemd, no cgroups, MPI plugin pmix (so mpi4py also works under srun).
set -euo pipefail
if [ "${1:-start}" = stop ]; then
  scontrol shutdown >/dev/null 2>&1 || true
  exit 0
fi
if ! command -v slurmctld >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null
fi
H=$(hostname -s)
CPUS=$(nproc --all)  # --all: OMP_NUM_THREADS would otherwise cap it
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$H
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=pmix
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
NodeName=$H CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
service munge start >/dev/null
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o %t 2>/dev/null | grep -q -E "idle|mix|alloc"; then
    echo "[slurm] node $H up"; exit 0
  fi
  sleep 1
done
echo "[slurm] node did not come up; see /var/log/slurm/" >&2
exit 1
