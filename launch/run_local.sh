#!/usr/bin/env bash
# Train on one machine with torchrun: NPROC local ranks (default 2) on CONFIG.
# Extra arguments go to megatron_ext.train, e.g. --set train.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
CONFIG=${CONFIG:-configs/run/tiny.yaml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" \
  -m megatron_ext.train --config "$CONFIG" "$@"
