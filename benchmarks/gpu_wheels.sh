#!/usr/bin/env bash
# Prepare, on a machine with PyPI, the wheels the GPU machine lacks (it has Python 3.12, torch,
# triton, transformers, pytest but no registry): megatron-core, DeepSpeed (a source package, built
# here as a wheel with no compiled ops) and their missing pure or binary dependencies, into .whl/
# (git-ignored through .git/info/exclude). Copy .whl/ with the checkout to the GPU machine and run
# benchmarks/gpu_proof.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" -d .whl megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types typing-inspection "typing-extensions>=4.16" hjson
[ -n "$(ls .whl/deepspeed-*.whl 2>/dev/null)" ] || \
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
du -sh .whl
