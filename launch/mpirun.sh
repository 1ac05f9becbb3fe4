#!/usr/bin/env bash
# Train under Open MPI's mpirun: NP ranks (rank and world read from OMPI_COMM_WORLD_*).
#   one node     NP=2 bash launch/mpirun.sh [--set key=value ...]
#   several      HOSTFILE=hosts NP=<total> bash launch/mpirun.sh  (MASTER_ADDR defaults to the
#                first host; Open MPI starts remote ranks through its own daemons)
# Works as root (Open MPI refuses root unless told twice, as below).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NP=${NP:-2}
export MASTER_PORT=${MASTER_PORT:-29620}
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
ARGS=(-n "$NP" -x MASTER_PORT -x OMP_NUM_THREADS -x PYTHONPATH)
if [ -n "${HOSTFILE:-}" ]; then
  export MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
  ARGS+=(--hostfile "$HOSTFILE" -x MASTER_ADDR)
fi
exec mpirun "${ARGS[@]}" "$PYTHON" -m "$ENTRY" --config "$CONFIG" "$@"
