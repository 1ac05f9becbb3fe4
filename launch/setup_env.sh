#!/usr/bin/env bash
# Create .venv and install megatron-ext with its dev tools. Idempotent; re-run after pulling.
#   CPU machine : torch 2.13.0, CPU build: asked of PyTorch's CPU wheel index first
#                 (TORCH_CPU_INDEX), the default pip index when that index cannot be reached;
#                 then the rest with launch/constraints-cpu.txt so torch is never swapped
#   CUDA machine: a torch you installed first is kept; else torch from TORCH_INDEX, e.g.
#                 https://download.pytorch.org/whl/cu128 (default: the default pip index, whose
#                 Linux torch is a CUDA build); then the same stack
# Also installs Open MPI from Debian when run as root and mpirun is missing (mpirun tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ "$(id -u)" = 0 ] && ! command -v mpirun >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  echo "[setup] installing Open MPI (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    openmpi-bin libopenmpi-dev >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

reachable() {  # can this machine fetch the index page of `torch` from index $1?
  "$PY" - "$1" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=15)
except Exception as err:
    print(f"[setup] {sys.argv[1]} is unreachable ({type(err).__name__}: {err})")
    sys.exit(1)
PY
}

has_torch() {  # is torch $1 (any build) already installed?
  "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$1')" 2>/dev/null
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] CUDA machine: torch (CUDA build) from ${TORCH_INDEX:-the default index}"
  "${PIP[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch>=2.6"
  DS_BUILD_OPS=0 "${PIP[@]}" -e ".[dev]"
else
  if has_torch "$TORCH_VERSION"; then
    echo "[setup] CPU machine: torch $TORCH_VERSION already installed"
  elif reachable "$TORCH_CPU_INDEX"; then
    echo "[setup] CPU machine: torch $TORCH_VERSION (CPU build) from $TORCH_CPU_INDEX"
    "${PIP[@]}" --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"
  else
    echo "[setup] CPU machine: torch $TORCH_VERSION from the default index instead"
    "${PIP[@]}" "torch==$TORCH_VERSION"
  fi
  DS_BUILD_OPS=0 "${PIP[@]}" -c launch/constraints-cpu.txt -e ".[dev]"
  if "$PY" -m pip list 2>/dev/null | grep -i -E "^(nvidia-|cuda-)"; then
    echo "[setup] error: CUDA packages were pulled into a CPU environment (the default index" \
      "served a CUDA build of torch); set TORCH_CPU_INDEX to a reachable CPU wheel index" >&2
    exit 1
  fi
fi
"$PY" -c "import torch, megatron.core, megatron_ext; \
print(f'[setup] ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, \
megatron_ext {megatron_ext.__version__}')" 2>&1 | grep -v -i "warn"
