#!/usr/bin/env bash
# The GPU check in one prepared run (< 9 minutes on one H200), results under $OUT:
#   1. install the wheels in .whl/ (benchmarks/gpu_wheels.sh made them) into /tmp/site;
#   2. bf16 numerics of every fast path against fp64 (benchmarks/gpu_numerics.py);
#   3. the kernel benchmark (Triton, DCA fused / on cuDNN or flash pieces, CoCA vs SDPA);
#   4. a tile sweep of the Triton kernels (benchmarks/tune_triton.py);
#   5. a whole-model training step per method (tokens/s, MFU);
#   6. the `gpu`-marked tests (bf16 kernels, training steps on CUDA).
# Each stage has its own time limit and the script goes on after a failure, so one broken stage
# does not cost the others; stages 2-5 write their tables into docs/benchmarks.md, copied to
# $OUT. Copy .whl/ along with the checkout to the GPU machine, then:
#   bash benchmarks/gpu_proof.sh        (OUT=<folder for the logs>, default /tmp/gpu_proof)
# STAGES="numerics bench tune step tests" (the default) picks which stages run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_proof}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
S="$OUT/summary.txt"
nvidia-smi > "$S" 2>&1
python3 -c "import torch, triton, megatron.core, deepspeed, megatron_ext; print(torch.__version__, \
triton.__version__, torch.cuda.get_device_name(0), megatron.core.__version__, \
deepspeed.__version__)" 2>&1 | tee -a "$S"

STAGES=${STAGES:-numerics bench tune step tests}
STEP_METHODS=${STEP_METHODS:-rope dca dca-cudnn-pieces coca hybrid-swa}
BENCH_ARGS=${BENCH_ARGS:---sizes 4096 16384 65536}
stage() {  # stage KEY NAME SECONDS LOG COMMAND...
  local key=$1 name=$2 secs=$3 log=$4; shift 4
  [[ " $STAGES " == *" $key "* ]] || return 0
  echo "== $name" | tee -a "$S"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$log" 2>&1
  echo "   rc=$? in $((SECONDS - t0)) s" | tee -a "$S"
  tail -25 "$OUT/$log" >> "$S"
}
stage numerics numerics 70 numerics.log python3 benchmarks/gpu_numerics.py --write
stage bench "kernel benchmark" 170 bench_gpu.log \
  python3 benchmarks/bench_gpu.py --write $BENCH_ARGS
stage tune "triton tile sweep" 100 tune.log python3 benchmarks/tune_triton.py --budget-s 70 --write
stage step "model step per method" 200 bench_step.log \
  python3 benchmarks/bench_gpu_step.py --write --reps 2 --methods $STEP_METHODS
stage tests "gpu tests" 150 gpu_tests.log \
  python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --durations=5
cp docs/benchmarks.md "$OUT/benchmarks.md"
tail -40 "$S"
