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
# timm (EVA02 and other timm vision towers) and the torchvision it imports go into a folder of their own,
# never site-packages: PyPI's torchvision for this torch is a CUDA build whose compiled ops do not load
# beside the CPU torch wheel, and transformers imports torchvision whenever it is installed. The timm tests
# put the folder on their path (tests/_timm_environment.py); timm's own dependencies (pyyaml,
# huggingface_hub, safetensors) are already installed.
pin() { sed -n "s/^$1==//p" requirements/pins.txt; }
TIMM_SITE=.venv/timm-site
if [ ! -d "$TIMM_SITE/timm-$(pin timm).dist-info" ] || [ ! -d "$TIMM_SITE/torchvision-$(pin torchvision).dist-info" ]; then
  rm -rf "$TIMM_SITE"
  "${PIP[@]}" install -q --no-deps --target "$TIMM_SITE" "timm==$(pin timm)" "torchvision==$(pin torchvision)"
fi
.venv/bin/python -m llm2clip_fast.info | sed -n '/^extensions:/,/^$/p'
