#!/usr/bin/env bash
# Train with the DeepSpeed launcher on one node (no hostfile, no ssh): NGPU ranks.
# On a CPU machine ranks are processes (gloo); on GPUs one rank per GPU (NCCL).
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-2}
CONFIG=${CONFIG:?set CONFIG=configs/run/<run>.yaml}
MASTER_PORT=${MASTER_PORT:-29650}
exec .venv/bin/deepspeed --num_gpus "$NGPU" --master_port "$MASTER_PORT" \
  --module megatron_ext.train --config "$CONFIG" "$@"
