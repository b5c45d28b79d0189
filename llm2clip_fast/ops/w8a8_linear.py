"""The 8-bit linear of the frozen LLM: per-token dynamic activation scales, per-channel weight scales.

``w8a8_linear(x, weight_q, weight_scale, bias, inv_smooth)`` computes ``y = x W^T + b`` from a weight
quantised per output channel (``W ~= weight_q * weight_scale[:, None]``, int8 or float8 e4m3) and the
activation quantised per row (token) at run time, after the optional SmoothQuant division
``x * inv_smooth`` (the weight was multiplied by the smoothing factors when it was quantised). Backends:

- ``cpu`` (int8, float32/bfloat16 activations): one pass of ``llm2clip_fast._C``'s row kernels for the
  scaling, per-row absmax and int8 codes, oneDNN's int8 GEMM on a prepacked weight
  (``torch.ops.onednn.qlinear_pointwise``, AMX/VNNI where the CPU has them) with the weight scales in its
  epilogue, and one pass for the row scales and bias.
- ``triton`` (CUDA): one Triton pass for the codes and row scales (``llm2clip_fast.kernels.quantize``);
  int8: ``torch._int_mm`` and one Triton pass for ``acc * row * column scales + bias``; fp8:
  ``torch._scaled_mm`` with row-wise scales (scales and bias in cuBLASLt's epilogue, bf16 output).
- ``torch``: the same quantisation as torch ops and a float matmul of the dequantised codes: the
  reference, and the fallback for what the others refuse (shapes the fast GEMMs do not take, CPU fp8).

Why not torchao's ``Int8DynamicActivationInt8WeightConfig`` / ``Float8DynamicActivationFloat8WeightConfig``
(0.18, installable beside torch 2.13): on this project's CPU its int8 path was 6x slower than a bf16
linear per layer (measured: 4096x384x1536, 17.96 ms against 2.85 ms bf16 autocast; its per-token
quantisation runs as several torch ops and ``torch._int_mm`` without a prepacked weight), and neither
config fuses a SmoothQuant factor into the activation quantisation, which the int8 fidelity needs
(``llm2clip_fast.models.llm_quantization``). The GEMMs themselves are the same torch primitives torchao
calls on CUDA. ``bench/embed_throughput.py`` measures torchao's configs beside these when it is installed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._extensions import cpu_extension_error
from . import _backend
from ._availability import cpu_has_fast_bf16, kernel_module_problem, triton_reasons
from ._backend import Backend, DispatchContext

OP_NAME = "w8a8_linear"
INT8, FP8 = torch.int8, torch.float8_e4m3fn
CODE_MAX = {INT8: 127.0, FP8: 448.0}
_TINY = torch.finfo(torch.float32).tiny
# torch._int_mm on CUDA needs more than 16 rows and K, N multiples of 8; _scaled_mm multiples of 16.
_CUDA_INT_MM_MIN_ROWS = 17


def quantize_weight(weight: torch.Tensor, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric codes: ``(weight_q (N, K), weight_scale (N,) fp32)``."""
    if code_dtype not in CODE_MAX:
        raise ValueError(f"code_dtype must be torch.int8 or torch.float8_e4m3fn, got {code_dtype}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(_TINY) / CODE_MAX[code_dtype]
    scaled = w / scale[:, None]
    if code_dtype == INT8:
        return scaled.round().clamp(-127, 127).to(INT8), scale
    return scaled.clamp(-448.0, 448.0).to(FP8), scale


def quantize_rows_torch(x: torch.Tensor, inv_smooth: torch.Tensor | None,
                        code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row codes of ``x * inv_smooth`` as torch ops: ``(codes (M, K), scale (M,) fp32)``."""
    xs = x.float() if inv_smooth is None else x.float() * inv_smooth.float()
    amax = xs.abs().amax(dim=-1)
    tiny = amax < _TINY
    qmax = CODE_MAX[code_dtype]
    scale = torch.where(tiny, torch.ones_like(amax), amax / qmax)
    scaled = (xs * torch.where(tiny, torch.zeros_like(amax), qmax / amax.clamp_min(_TINY))[:, None])
    scaled = scaled.clamp(-qmax, qmax)
    codes = scaled.round().to(INT8) if code_dtype == INT8 else scaled.to(FP8)
    return codes, scale


def _run_torch(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               inv_smooth: torch.Tensor | None, packed: object | None) -> torch.Tensor:
    codes, scale = quantize_rows_torch(x, inv_smooth, weight_q.dtype)
    # int8 and e4m3 codes are exact in bf16: where bf16 GEMMs are native the product of the codes runs
    # there (fp32 accumulation; the output's bf16 rounding is far below the codes' own).
    dt = torch.bfloat16 if x.device.type == "cuda" or cpu_has_fast_bf16() else torch.float32
    y = torch.mm(codes.to(dt), weight_q.to(dt).t()).float() * scale[:, None] * weight_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _run_cpu(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
             inv_smooth: torch.Tensor | None, packed: object | None) -> torch.Tensor:
    codes, scale = torch.ops.llm2clip_fast.int8_quantize_rows_cpu(x, inv_smooth)
    if packed is None:
        packed = prepack_cpu_weight(weight_q)
    zero_points = torch.zeros(weight_scale.shape, dtype=torch.int64)
    # Activation scale 1 and zero point 0: the per-row scales are applied after, with the bias.
    y = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, packed, weight_scale, zero_points, None, 1.0, 0,
                                           x.dtype, "none", [None], "")
    torch.ops.llm2clip_fast.int8_scale_rows_cpu_(y, scale, bias)
    return y


def prepack_cpu_weight(weight_q: torch.Tensor) -> object:
    """oneDNN's packed layout of an int8 weight (N, K) for :func:`w8a8_linear`'s cpu backend."""
    return torch.ops.onednn.qlinear_prepack(weight_q, None)


def _run_triton(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, inv_smooth: torch.Tensor | None,
                packed: object | None) -> torch.Tensor:
    from ..kernels import quantize as K

    m = x.shape[0]
    codes, scale = K.quantize_rows(x, inv_smooth, weight_q.dtype)
    if weight_q.dtype == FP8:
        # Row-wise scaling runs in cuBLASLt's epilogue; it takes bf16 output and bias.
        y = torch._scaled_mm(codes, weight_q.t(), scale_a=scale[:, None], scale_b=weight_scale[None, :],
                             bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
        return y.to(x.dtype)
    if m < _CUDA_INT_MM_MIN_ROWS:
        codes = F.pad(codes, (0, 0, 0, _CUDA_INT_MM_MIN_ROWS - m))
    acc = torch._int_mm(codes, weight_q.t())[:m]
    return K.dequantize_int32(acc, scale, weight_scale, bias, x.dtype)


def w8a8_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, inv_smooth: torch.Tensor | None = None, *,
                packed: object | None = None, backend: str | None = None) -> torch.Tensor:
    """``y = x W^T + b`` with 8-bit weight and per-row 8-bit activation (see the module docstring).

    x: (M, K) float32/bfloat16/float16. weight_q: (N, K) int8 or float8_e4m3fn; weight_scale: (N,) fp32;
    bias: (N,) or None; inv_smooth: (K,) or None. ``packed``: the cpu backend's prepacked weight
    (:func:`prepack_cpu_weight`), made per call when None. Returns (M, N) in x's dtype.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (M, K) tensor, got {x.dtype} {tuple(x.shape)}")
    if weight_q.dtype not in CODE_MAX or weight_q.dim() != 2 or weight_q.shape[1] != x.shape[1]:
        raise ValueError(f"weight_q must be int8 or float8_e4m3fn of shape (N, {x.shape[1]}), got "
                         f"{weight_q.dtype} {tuple(weight_q.shape)}")
    if weight_scale.shape != weight_q.shape[:1]:
        raise ValueError(f"weight_scale must have shape ({weight_q.shape[0]},), got "
                         f"{tuple(weight_scale.shape)}")
    tensors = [x, weight_q, weight_scale] + [t for t in (bias, inv_smooth) if t is not None]
    chosen = _backend.select_backend(OP_NAME, tensors, backend=backend)
    _backend.record_selection(OP_NAME, chosen)
    return chosen.run(x, weight_q, weight_scale, bias, inv_smooth, packed)


@functools.cache
def _cpu_problem() -> str | None:
    problem = cpu_extension_error()
    if problem is None and not hasattr(torch.ops.llm2clip_fast, "int8_quantize_rows_cpu"):
        problem = "llm2clip_fast._C was built without the int8 row kernels; rebuild the extension"
    if problem is None and not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn,
                                                                                "qlinear_pointwise")):
        problem = "this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)"
    return problem


def _cpu_reasons(ctx: DispatchContext) -> list[str]:
    x, wq = ctx.tensors[0], ctx.tensors[1]
    why = []
    if ctx.device.type != "cpu":
        why.append(f"tensors are on {ctx.device.type}; the cpu backend serves cpu tensors")
    if wq.dtype != INT8:
        why.append(f"weight codes are {wq.dtype}; the cpu backend serves int8 (CPU fp8 runs on torch)")
    if x.dtype not in (torch.float32, torch.bfloat16):
        why.append(f"activations are {x.dtype}; the row kernels take float32 or bfloat16")
    problem = _cpu_problem()
    if problem:
        why.append(problem)
    return why


def _triton_reasons(ctx: DispatchContext) -> list[str]:
    x, wq = ctx.tensors[0], ctx.tensors[1]
    why = triton_reasons(ctx)
    if ctx.device.type == "cpu" and wq.dtype == FP8:
        why.append("fp8 codes need a GPU (the interpreter has no float8)")
    if not why and ctx.device.type == "cuda":
        k, n = wq.shape[1], wq.shape[0]
        multiple = 16 if wq.dtype == FP8 else 8
        if k % multiple or n % multiple:
            gemm = "torch._scaled_mm" if wq.dtype == FP8 else "torch._int_mm"
            why.append(f"{gemm} needs K and N multiples of {multiple}, got K={k}, N={n}")
        if wq.dtype == FP8 and torch.cuda.get_device_capability(x.device) < (8, 9):
            why.append("fp8 GEMMs need compute capability 8.9 or newer (Ada, Hopper)")
    if not why:
        problem = kernel_module_problem("quantize")
        if problem:
            why.append(problem)
    return why


_backend.register_op(OP_NAME, [
    Backend("triton", run=_run_triton, reasons=_triton_reasons,
            description="Triton row quantisation + torch._int_mm / torch._scaled_mm (row-wise scales)"),
    Backend("cpu", run=_run_cpu, reasons=_cpu_reasons,
            description="C++ row quantisation + oneDNN int8 GEMM on a prepacked weight"),
    Backend("torch", run=_run_torch, reasons=lambda ctx: [],
            description="torch-op quantisation, float matmul of the dequantised codes (reference)"),
], description="8-bit linear (per-token activations, per-channel weights)",
    probe=lambda device, dtype: _probe(device, dtype))


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = torch.randn(8, 64, device=device, dtype=dtype)
    weight_q, weight_scale = quantize_weight(torch.randn(32, 64), INT8)
    return x, weight_q.to(device), weight_scale.to(device)
