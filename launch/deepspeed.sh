#!/usr/bin/env bash
# Train with the DeepSpeed launcher (ranks find each other through megatron_ext.dist).
#   one node      NGPU ranks here, no hostfile, no ssh:
#                   CONFIG=configs/run/tiny.yaml bash launch/deepspeed.sh [--set key=value ...]
#   nodes, no ssh run this once on every node with the same HOSTFILE ("host slots=N" per line):
#                   HOSTFILE=hosts NODE_RANK=<i> MASTER_ADDR=<node 0> bash launch/deepspeed.sh
#   SLURM         inside an allocation (sbatch / salloc); DeepSpeed starts the ranks with srun,
#                 the hostfile is written from the allocation:
#                   LAUNCHER=slurm NGPU=<ranks per node> bash launch/deepspeed.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NGPU=${NGPU:-2}
MASTER_PORT=${MASTER_PORT:-29650}
LAUNCHER=${LAUNCHER:-}
DS=("$PYTHON" -m deepspeed.launcher.runner --master_port "$MASTER_PORT")

if [ "$LAUNCHER" = slurm ]; then
  : "${SLURM_JOB_NODELIST:?LAUNCHER=slurm runs inside a SLURM allocation (sbatch or salloc)}"
  HOSTFILE=${HOSTFILE:-${TMPDIR:-/tmp}/ds-hostfile.$SLURM_JOB_ID}
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$NGPU/" > "$HOSTFILE"
  MASTER_ADDR=${MASTER_ADDR:-$(head -n 1 "$HOSTFILE" | cut -d' ' -f1)}
  # srun cannot run `python -m`, so the ranks run the entry module's file
  SCRIPT=$("$PYTHON" -c "import importlib.util as u; print(u.find_spec('$ENTRY').origin)")
  exec "${DS[@]}" --hostfile "$HOSTFILE" --launcher slurm --force_multi --no_ssh_check \
    --master_addr "$MASTER_ADDR" "$SCRIPT" --config "$CONFIG" "$@"
elif [ -n "${HOSTFILE:-}" ]; then
  : "${NODE_RANK:?set NODE_RANK (0 on the first node of HOSTFILE, 1 on the next, ...)}"
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node of HOSTFILE}"
  exec "${DS[@]}" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --module "$ENTRY" --config "$CONFIG" "$@"
else
  exec "${DS[@]}" --num_gpus "$NGPU" --module "$ENTRY" --config "$CONFIG" "$@"
fi
