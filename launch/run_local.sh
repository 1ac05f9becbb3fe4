#!/usr/bin/env bash
# The main job on one machine, end to end (4-7 minutes on 2 CPU cores):
#   1. pretrain a tiny RoPE GPT at 128 tokens on the embedded corpus (torchrun, 2 ranks, each
#      sequence split over both: context parallel)                      -> runs/tiny
#   2. continue it at 4x the length (512 tokens) with Dual Chunk Attention, CP=2, under the
#      DeepSpeed launcher with ZeRO-2 (weights only, train.init_from)   -> runs/tiny_long_dca
#   3. held-out perplexity of both at 1x and 4x the first length        -> <run>/eval.json
#      and passkey retrieval of the second at 1x and 4x                  -> passkey.json
#   4. export the second to Hugging Face safetensors                    -> runs/tiny_long_dca_hf
#   5. print where everything is.
# Environment: NPROC (ranks, default 2), STEPS1 / STEPS2 (steps of each stage), OUT (runs/),
# RUN1 / RUN2 (the two run YAMLs). Reruns replace the two run directories (--overwrite) and
# the export.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/common.sh"
cd "$MEGATRON_EXT_HOME"
NPROC=${NPROC:-2}
STEPS1=${STEPS1:-1200}
STEPS2=${STEPS2:-150}
OUT=${OUT:-runs}
RUN1=${RUN1:-configs/run/tiny.yaml}
RUN2=${RUN2:-configs/run/tiny_long_dca.yaml}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$MEGATRON_EXT_HOME/.cache/torch_extensions}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
start=$(date +%s)

echo "== 1/3 pretrain: tiny RoPE at 128 tokens, $NPROC ranks (torchrun, context parallel)"
NPROC=$NPROC CONFIG="$RUN1" bash "$HERE/torchrun.sh" --overwrite \
  --set train.steps="$STEPS1" --set train.out_dir="$OUT/tiny" --set train.eval_interval=200 \
  --set train.save_interval=200 "$@"

echo "== 2/3 continue at 4x the length with DCA: CP=2, DeepSpeed launcher, ZeRO-2"
NGPU=$NPROC CONFIG="$RUN2" bash "$HERE/deepspeed.sh" --overwrite \
  --set train.init_from="$OUT/tiny" --set train.out_dir="$OUT/tiny_long_dca" \
  --set train.steps="$STEPS2" "$@"

echo "== 3/3 held-out perplexity at 1x (128) and 4x (512) tokens"
"$PYTHON" -m megatron_ext.training.evaluate "$OUT/tiny" --seq-lengths 128 512
"$PYTHON" -m megatron_ext.training.evaluate "$OUT/tiny_long_dca" --seq-lengths 128 512
echo "== passkey retrieval at 1x and 4x (a model this small is not expected to find it)"
"$PYTHON" -m megatron_ext.eval --checkpoint "$OUT/tiny_long_dca" --tasks passkey \
  --lengths 128,512 --trials 2 --out "$OUT/tiny_long_dca/passkey.json"
echo "== export the continued model to Hugging Face (safetensors)"
rm -rf "$OUT/tiny_long_dca_hf"  # the converter refuses a non-empty destination
"$PYTHON" -m megatron_ext.convert mcore2hf \
  --src "$OUT/tiny_long_dca/checkpoints/$(cat "$OUT/tiny_long_dca/checkpoints/latest")" \
  --dst "$OUT/tiny_long_dca_hf"

echo "== done in $(( $(date +%s) - start )) s"
for run in "$OUT/tiny" "$OUT/tiny_long_dca"; do
  echo "$run/: config.yaml, world.json, metrics.jsonl, loss.png, eval.json, tensorboard/,"
  echo "  checkpoints/$(cat "$run/checkpoints/latest")"
done
echo "$OUT/tiny_long_dca/passkey.json (passkey), deepspeed.json (the generated DeepSpeed config)"
echo "$OUT/tiny_long_dca_hf/: the continued model in Hugging Face format (safetensors)"
echo "tensorboard --logdir $OUT    # curves of both runs"
