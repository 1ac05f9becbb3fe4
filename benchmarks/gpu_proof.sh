#!/usr/bin/env bash
# The GPU check in one prepared run (< 8 minutes on one H200), results under $OUT:
#   1. install the wheels in .whl/ (benchmarks/gpu_wheels.sh made them) into /tmp/site;
#   2. the `gpu`-marked tests (bf16 kernels, training steps on CUDA);
#   3. the kernel benchmark (Triton, DCA, CoCA vs SDPA flash / cuDNN) -> docs/benchmarks.md rows;
#   4. a whole-model CP-free training step per method (tokens/s) on CUDA.
# Each stage has its own time limit and the script goes on after a failure, so one broken stage
# does not cost the others. Copy .whl/ along with the checkout to the GPU machine, then:
#   bash benchmarks/gpu_proof.sh        (OUT=<folder for the logs>, default /tmp/gpu_proof)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_proof}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, megatron.core, deepspeed, megatron_ext; print(torch.__version__, \
torch.cuda.get_device_name(0), megatron.core.__version__, deepspeed.__version__)" \
  | tee "$OUT/versions.txt"

echo "== gpu tests" | tee "$OUT/summary.txt"
timeout 210 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -3 | tee -a "$OUT/summary.txt"

echo "== kernel benchmark" | tee -a "$OUT/summary.txt"
timeout 180 python3 benchmarks/bench_gpu.py --write --sizes 4096 16384 65536 2>&1 \
  | tee "$OUT/bench_gpu.log" | tail -20 | tee -a "$OUT/summary.txt"

echo "== model step per method" | tee -a "$OUT/summary.txt"
timeout 90 python3 benchmarks/bench_gpu_step.py 2>&1 | tee "$OUT/bench_step.log" \
  | tail -8 | tee -a "$OUT/summary.txt"
cp docs/benchmarks.md "$OUT/benchmarks.md"
