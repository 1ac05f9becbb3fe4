#!/usr/bin/env bash
# Train with torchrun: NPROC ranks per node on NNODES nodes.
#   one node     bash launch/torchrun.sh [--set key=value ...]
#   several      run once on every node (static rendezvous at node 0, no ssh):
#                  NNODES=2 NODE_RANK=<i> MASTER_ADDR=<node 0> bash launch/torchrun.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
if [ "$NNODES" = 1 ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m "$ENTRY" --config "$CONFIG" "$@"
fi
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29640}" \
  -m "$ENTRY" --config "$CONFIG" "$@"
