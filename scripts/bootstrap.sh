#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with torch (the CPU build where there is
# no NVIDIA driver), llm2clip_fast built in place with its C++ (and, where nvcc exists, CUDA)
# extensions, and everything the demo and the tests need. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # The pinned release; on these machines pip finds its CPU build on local disk. Elsewhere, install
  # the torch you want into .venv first (e.g. a CUDA build) and this step leaves it alone.
  "${PIP[@]}" install -c requirements/pins.txt "torch==2.13.0"
fi
# ninja: torch builds _C's sources in parallel with it (MAX_JOBS), one by one without.
"${PIP[@]}" install -q -c requirements/pins.txt setuptools pybind11 ninja
# --no-build-isolation: build against the torch just installed, not a freshly fetched one.
"${PIP[@]}" install -q -c requirements/pins.txt --no-build-isolation -e ".[test]"
.venv/bin/python -m llm2clip_fast.info | sed -n '/^extensions:/,/^$/p'
