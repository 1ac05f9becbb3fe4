#!/usr/bin/env bash
# Train under Open MPI's mpirun: NP ranks (rank/world read from OMPI_COMM_WORLD_*).
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
CONFIG=${CONFIG:?set CONFIG=configs/run/<run>.yaml}
export MASTER_PORT=${MASTER_PORT:-29620}
exec mpirun -n "$NP" -x MASTER_PORT -x OMP_NUM_THREADS=1 \
  .venv/bin/python -m megatron_ext.train --config "$CONFIG" "$@"
