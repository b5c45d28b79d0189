"""Reasons shared by backends of many ops: is Triton usable, is an extension built, right device."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from .._extensions import cpu_extension_error, cuda_runtime_problem
from ._backend import DispatchContext


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def triton_import_problem() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


INSTALL_HINT = "pip install --no-build-isolation --no-deps -e ."


@functools.cache
def kernel_module_problem(module: str) -> str | None:
    """Why ``llm2clip_fast.kernels.<module>`` cannot be imported, or None when it imports.

    A backend that would need the module lists this as a reason, so a forced Triton backend raises
    with the import error in its message and automatic dispatch moves on, instead of the error
    surfacing (or being swallowed) later.
    """
    try:
        importlib.import_module(f"..kernels.{module}", __package__)
    except Exception as exc:  # any failure to import means the backend cannot run; say which
        return (f"cannot import llm2clip_fast.kernels.{module} ({type(exc).__name__}: {exc}); "
                f"from a source checkout run `{INSTALL_HINT}`")
    return None


def triton_kernel_reasons(ctx: DispatchContext, module: str) -> list[str]:
    """:func:`triton_reasons`, then (only if those pass) whether the kernel module imports.

    The import is tried last so automatic dispatch on CPU tensors never imports Triton kernels
    (their interpreter mode is fixed at import time by TRITON_INTERPRET).
    """
    why = triton_reasons(ctx)
    if not why:
        problem = kernel_module_problem(module)
        if problem:
            why.append(problem)
    return why


def triton_reasons(ctx: DispatchContext) -> list[str]:
    """Triton serves CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 and only when forced."""
    why = []
    problem = triton_import_problem()
    if problem:
        why.append(problem)
    dev = ctx.device
    if dev.type == "cuda":
        if triton_interpreter_on():
            why.append("TRITON_INTERPRET=1 is set, so Triton cannot launch on CUDA tensors")
    elif dev.type == "cpu":
        if not triton_interpreter_on():
            why.append("tensors are on cpu; Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
        elif not ctx.forced:
            why.append("the Triton interpreter runs CPU tensors only when forced (backend='triton'): slow")
    else:
        why.append(f"tensors are on {dev.type}; Triton here serves cuda")
    return why


def cpu_extension_reasons(ctx: DispatchContext) -> list[str]:
    why = []
    err = cpu_extension_error()
    if err:
        why.append(err)
    if ctx.device.type != "cpu":
        why.append(f"tensors are on {ctx.device.type}; the C++ extension serves cpu tensors")
    return why


def cuda_extension_reasons(ctx: DispatchContext) -> list[str]:
    why = []
    if ctx.device.type != "cuda":
        why.append(f"tensors are on {ctx.device.type}; llm2clip_fast._cuda serves cuda tensors")
    problem = cuda_runtime_problem()
    if problem:
        why.append(problem)
    return why


def dtype_reasons(ctx: DispatchContext, allowed: tuple[torch.dtype, ...]) -> list[str]:
    bad = sorted(str(d) for d in ctx.dtypes if d not in allowed)
    if bad:
        return [f"dtype {', '.join(bad)} not supported (supports {', '.join(str(d) for d in allowed)})"]
    return []


def floating_dtype_reasons(ctx: DispatchContext) -> list[str]:
    """Plain-torch paths serve any floating dtype and refuse integer/bool ones."""
    bad = sorted(str(d) for d in ctx.dtypes if not d.is_floating_point)
    return [f"dtype {', '.join(bad)} is not a floating dtype"] if bad else []


def triton_half_or_float_reasons(ctx: DispatchContext, module: str) -> list[str]:
    """Triton's reasons (kernel module ``module`` included) plus the dtypes the loss kernels take."""
    return triton_kernel_reasons(ctx, module) + dtype_reasons(
        ctx, (torch.float32, torch.float16, torch.bfloat16))


def reference_reasons(ctx: DispatchContext) -> list[str]:
    """The materialising reference runs only when forced: it holds O(B^2) memory."""
    return [] if ctx.forced else ["the reference materialises O(B^2) memory; it serves only when forced"]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16/AMX); the SigLIP CPU path asks it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
