#!/usr/bin/env bash
# Create .venv and install megatron-ext with its dev tools. Idempotent; re-run after pulling.
#   CPU machine : torch 2.13.0 CPU build (pinned through launch/constraints-cpu.txt)
#   CUDA machine: the default CUDA build of torch from PyPI, then the same stack
# Also installs Open MPI from Debian when run as root and mpirun is missing (mpirun tests).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ "$(id -u)" = 0 ] && ! command -v mpirun >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  echo "[setup] installing Open MPI (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    openmpi-bin libopenmpi-dev >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] CUDA machine: installing the CUDA build of torch"
  "${PIP[@]}" "torch>=2.6"
  DS_BUILD_OPS=0 "${PIP[@]}" -e ".[dev]"
else
  echo "[setup] CPU machine: installing torch 2.13.0 (CPU build)"
  "${PIP[@]}" torch==2.13.0
  DS_BUILD_OPS=0 "${PIP[@]}" -c launch/constraints-cpu.txt -e ".[dev]"
  if "$VENV/bin/python" -m pip list 2>/dev/null | grep -i -E "^(nvidia-|cuda-)"; then
    echo "[setup] error: CUDA packages were pulled into a CPU environment" >&2
    exit 1
  fi
fi
"$VENV/bin/python" -c "import torch, megatron.core, megatron_ext; \
print(f'[setup] ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, \
megatron_ext {megatron_ext.__version__}')" 2>&1 | grep -v -i "warn"
