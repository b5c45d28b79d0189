"""Make timm importable for the tests that need it, or say why it is not.

``scripts/bootstrap.sh`` installs timm and torchvision (pinned in requirements/pins.txt) with
``pip install --no-deps --target .venv/timm-site``: a folder of their own, never the venv's
site-packages. The reason: PyPI's torchvision that matches our torch is a CUDA build; beside the CPU
torch wheel its ``_C`` extension cannot load (it needs libtorch_cuda.so), and then
``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` without checking that the ops exist, so ``import torchvision`` raises
``RuntimeError: operator torchvision::nms does not exist``. transformers imports torchvision whenever it
is installed, so in site-packages it would break every transformers import; in its own folder only the
tests that ask for it here see it.

:func:`require_timm` puts that folder (``$LLM2CLIP_TIMM_SITE``, default ``<venv>/timm-site``) on
``sys.path`` and, only when torchvision's ``_C`` cannot load, defines the schemas of those two ops so
that torchvision's pure-Python part imports (timm imports ``torchvision.ops.misc`` at import time but
never calls an op). This is test set-up only: the library never defines torchvision ops. Without timm
the calling test is skipped with a reason that ``conftest.py`` turns into a failure under CI.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SKIP_MARK = "timm is not importable"
HOW_TO_ENABLE = ("run scripts/bootstrap.sh (it installs the pinned timm and torchvision into "
                 ".venv/timm-site), or set LLM2CLIP_TIMM_SITE to a folder holding them")
_TORCHVISION_OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library: torch.library.Library | None = None  # kept alive: dropping it would undefine the ops


def timm_site() -> Path:
    """The folder bootstrap.sh installs timm and torchvision into."""
    return Path(os.environ.get("LLM2CLIP_TIMM_SITE") or Path(sys.prefix) / "timm-site")


def _torchvision_c_loads(site: Path) -> bool:
    """Whether torchvision's compiled ops load beside this torch (they do for a matching build)."""
    c_ext = next(iter(sorted((site / "torchvision").glob("_C*.so"))), None)
    if c_ext is None:
        return False
    try:
        torch.ops.load_library(str(c_ext))
    except (OSError, RuntimeError):
        return False
    return True


def _define_torchvision_op_schemas() -> None:
    global _library
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _TORCHVISION_OPS:
            _library.define(schema)


def require_timm() -> ModuleType:
    """``timm``, importable from the timm-site folder (or anywhere on the path); skips the test when it
    cannot be imported."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    site = timm_site()
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))
    if importlib.util.find_spec("timm") is None:
        pytest.skip(f"{SKIP_MARK}: not installed in {site} nor on the path; to run the timm/EVA tests, "
                    f"{HOW_TO_ENABLE}")
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is not None:
        tv_site = Path(importlib.util.find_spec("torchvision").origin).parent.parent
        if not _torchvision_c_loads(tv_site):
            _define_torchvision_op_schemas()
    try:
        return importlib.import_module("timm")
    except Exception as exc:
        pytest.skip(f"{SKIP_MARK}: import timm failed: {type(exc).__name__}: {exc}; to run the timm/EVA "
                    f"tests, {HOW_TO_ENABLE}")
