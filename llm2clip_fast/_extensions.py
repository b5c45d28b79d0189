"""Loading of the native extensions, remembering why one is unavailable.

Backends ask :func:`cpu_extension` / :func:`cuda_extension` and turn a ``None`` into a reason
(:func:`cpu_extension_error` / :func:`cuda_extension_error`) instead of failing at import time.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(name), None
    except ImportError as exc:  # not built, or built against another torch/python
        return None, (
            f"{name} is not importable ({exc}); reinstall with `pip install --no-build-isolation -e .`"
        )


def cpu_extension() -> ModuleType | None:
    """The C++ CPU extension ``llm2clip_fast._C`` (ops registered as ``torch.ops.llm2clip_fast.*``)."""
    return _load("llm2clip_fast._C")[0]


def cpu_extension_error() -> str | None:
    return _load("llm2clip_fast._C")[1]


def cuda_extension() -> ModuleType | None:
    """The raw CUDA extension ``llm2clip_fast._cuda`` (pybind11, no torch headers)."""
    return _load("llm2clip_fast._cuda")[0]


def cuda_extension_error() -> str | None:
    return _load("llm2clip_fast._cuda")[1]


@functools.cache
def cuda_runtime_problem() -> str | None:
    """Why kernels of ``_cuda`` cannot launch here, or ``None`` when a CUDA device answers.

    ``_cuda`` imports without a GPU (cudart is linked statically); asking it for the device count
    turns "CUDA driver version is insufficient" into a reason before any kernel is launched.
    """
    mod = cuda_extension()
    if mod is None:
        return cuda_extension_error()
    info = mod.runtime_info()
    if info["error"]:
        return f"no CUDA device for llm2clip_fast._cuda: {info['error']}"
    if info["device_count"] < 1:
        return "no CUDA device for llm2clip_fast._cuda (device count is 0)"
    return None
