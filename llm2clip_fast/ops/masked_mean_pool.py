"""Masked mean pooling of LLM hidden states (+ optional L2 normalisation), fused, with autograd.

``masked_mean_pool(hidden_states, mask)`` averages ``hidden_states`` (B, L, H) over the positions
where ``mask`` (B, L) is nonzero and returns (B, H) fp32, accumulated in fp32 whatever the input
dtype. It is how the LLM text encoder turns token states into a caption embedding (mean over the
caption's tokens, skipping an instruction prefix and padding).

Backends, in dispatch order: ``cuda`` (raw kernel, csrc/cuda/masked_mean_pool.cu), ``triton``
(llm2clip_kernels/masked_mean_pool.py; CPU tensors only under TRITON_INTERPRET=1 and when forced), ``cpu``
(C++/OpenMP, csrc/cpu/masked_mean_pool.cpp), ``torch`` (the reference formula). Each forward returns
the pooled rows and the L2 norm of each mean before normalisation; the backward is plain torch:
the gradient of a mean is the output gradient broadcast over the masked positions divided by their
count, preceded by the Jacobian of ``x / max(||x||, eps)`` when normalising.

torch.compile: the kernels are custom ops with fake implementations (``llm2clip_fast::
masked_mean_pool_forward`` in C++, ``masked_mean_pool_triton`` through ``torch.library.triton_op``,
``masked_mean_pool_cuda``); the autograd Function around them is traced by Dynamo, so
``torch.compile(fullgraph=True)`` of a model calling :func:`masked_mean_pool` has no graph break.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._extensions import cpu_extension, cuda_extension
from ._availability import (
    cpu_extension_reasons,
    cuda_extension_reasons,
    dtype_reasons,
    triton_kernel_reasons,
)
from ._backend import Backend, DispatchContext, record_selection, register_op, select_backend
from ._library import define_op

OP_NAME = "masked_mean_pool"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _run_torch(hidden: torch.Tensor, mask_u8: torch.Tensor, normalize: bool, eps: float):
    h = hidden.float()
    m = mask_u8.to(torch.float32).unsqueeze(-1)
    pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    norm = torch.linalg.vector_norm(pooled, dim=-1)
    if normalize:
        pooled = pooled / norm.clamp_min(eps).unsqueeze(-1)
    return pooled, norm


def _run_cpu(hidden: torch.Tensor, mask_u8: torch.Tensor, normalize: bool, eps: float):
    return torch.ops.llm2clip_fast.masked_mean_pool_forward(hidden, mask_u8, bool(normalize), float(eps))


def _pooled_fake(hidden: Tensor, mask_u8: Tensor, normalize: bool, eps: float) -> tuple[Tensor, Tensor]:
    B, _, H = hidden.shape
    return (hidden.new_empty((B, H), dtype=torch.float32), hidden.new_empty((B,), dtype=torch.float32))


def _triton_pool(hidden: Tensor, mask_u8: Tensor, normalize: bool, eps: float) -> tuple[Tensor, Tensor]:
    from ..kernels.masked_mean_pool import masked_mean_pool_triton

    return masked_mean_pool_triton(hidden, mask_u8, normalize, eps)


_run_triton = define_op("masked_mean_pool_triton", _triton_pool, _pooled_fake, triton=True)


def _cuda_pool(hidden: Tensor, mask_u8: Tensor, normalize: bool, eps: float) -> tuple[Tensor, Tensor]:
    mod = cuda_extension()
    B, L, H = hidden.shape
    out = torch.empty((B, H), dtype=torch.float32, device=hidden.device)
    norm = torch.empty((B,), dtype=torch.float32, device=hidden.device)
    with torch.cuda.device(hidden.device):
        stream = torch.cuda.current_stream(hidden.device).cuda_stream
        mod.masked_mean_pool(
            hidden.data_ptr(), mask_u8.data_ptr(), out.data_ptr(), norm.data_ptr(),
            B, L, H, hidden.stride(0), hidden.stride(1), _CUDA_DTYPE_CODES[hidden.dtype],
            bool(normalize), float(eps), stream,
        )
    return out, norm


# Raw pointers and a stream handle: opaque to the compiler, hence an op of its own.
_run_cuda = define_op("masked_mean_pool_cuda", _cuda_pool, _pooled_fake)


def _cpu_reasons(ctx: DispatchContext) -> list[str]:
    why = cpu_extension_reasons(ctx) + dtype_reasons(ctx, (*_DTYPES, torch.uint8, torch.bool))
    if not why and not hasattr(torch.ops.llm2clip_fast, "masked_mean_pool_forward"):
        why.append("llm2clip_fast._C was built without masked_mean_pool_forward; rebuild the extension")
    return why


def _cuda_reasons(ctx: DispatchContext) -> list[str]:
    why = cuda_extension_reasons(ctx) + dtype_reasons(ctx, (*_DTYPES, torch.uint8, torch.bool))
    mod = cuda_extension()
    if mod is not None and not hasattr(mod, "masked_mean_pool"):
        why.append("llm2clip_fast._cuda was built without masked_mean_pool; rebuild the extension")
    return why


def _triton_reasons(ctx: DispatchContext) -> list[str]:
    return triton_kernel_reasons(ctx, "masked_mean_pool") + dtype_reasons(
        ctx, (*_DTYPES, torch.uint8, torch.bool))


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    hidden = torch.zeros(2, 5, 8, device=device, dtype=dtype)
    return hidden, torch.ones(2, 5, device=device, dtype=torch.uint8)


register_op(
    OP_NAME,
    [
        Backend("cuda", _run_cuda, _cuda_reasons, "raw CUDA kernel (llm2clip_fast._cuda)"),
        Backend("triton", _run_triton, _triton_reasons, "Triton kernel"),
        Backend("cpu", _run_cpu, _cpu_reasons, "C++/OpenMP (llm2clip_fast._C)"),
        Backend("torch", _run_torch, lambda ctx: [], "plain torch, fp32 copy of the hidden states"),
    ],
    description="masked mean pooling (+ L2 normalisation) of (B, L, H) hidden states, fp32 output",
    probe=_probe,
)


class _MaskedMeanPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask_u8, normalize, eps, run):
        out, norm = run(hidden, mask_u8, normalize, eps)
        ctx.normalize = normalize
        ctx.eps = eps
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(mask_u8, out, norm)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mask_u8, out, norm = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        g = grad_out.float()
        if ctx.normalize:
            # y = x / max(|x|, eps): dx = (g - y (y.g)) / |x| where |x| > eps, else g / eps.
            big = (norm > ctx.eps).unsqueeze(-1)
            proj = g - out * (out * g).sum(dim=-1, keepdim=True)
            g = torch.where(big, proj / norm.clamp_min(ctx.eps).unsqueeze(-1), g / ctx.eps)
        weights = mask_u8.to(torch.float32)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        grad_hidden = weights.unsqueeze(-1) * g.unsqueeze(1)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None


def _check_inputs(hidden_states: object, mask: object) -> None:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must have shape (B, L, H), got {tuple(hidden_states.shape)}")
    if hidden_states.dtype not in _DTYPES:
        raise TypeError(f"hidden_states must be float32, float16 or bfloat16, got {hidden_states.dtype}")
    if mask.dim() != 2 or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"mask must have shape (B, L) = {tuple(hidden_states.shape[:2])}, got {tuple(mask.shape)}"
        )
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask must be a bool or integer tensor, got {mask.dtype}")
    if mask.device != hidden_states.device:
        raise ValueError(f"mask is on {mask.device} but hidden_states is on {hidden_states.device}")


def masked_mean_pool(
    hidden_states: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalize: bool = False,
    eps: float = 1e-12,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean of ``hidden_states`` over the positions where ``mask`` is nonzero, in fp32.

    Args:
        hidden_states: (B, L, H) float32, float16 or bfloat16.
        mask: (B, L) bool or integer; nonzero positions are averaged. A row with no such position
            gives zeros.
        normalize: L2-normalise each pooled row (``x / max(||x||, eps)``, as ``F.normalize``).
        eps: the normalisation's lower bound on the norm.
        backend: force ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"`` (else automatic dispatch;
            see :mod:`llm2clip_fast.ops._backend` for the environment variables).

    Returns:
        (B, H) float32. Differentiable with respect to ``hidden_states``.
    """
    _check_inputs(hidden_states, mask)
    if hidden_states.stride(-1) != 1:
        hidden_states = hidden_states.contiguous()
    # One byte per position for every backend: bool and uint8 share a layout, wider ints are narrowed.
    mask_u8 = (mask != 0).to(torch.uint8).contiguous()
    chosen = record_selection(OP_NAME, select_backend(OP_NAME, [hidden_states, mask_u8], backend=backend))
    return _MaskedMeanPoolFunction.apply(hidden_states, mask_u8, bool(normalize), float(eps), chosen.run)


def _register_fake() -> None:
    """Shape function of the C++ op, so torch.compile and torch.library.opcheck can trace it."""
    if cpu_extension() is None or not hasattr(torch.ops.llm2clip_fast, "masked_mean_pool_forward"):
        return  # the cpu backend refuses with the reason; nothing to describe

    torch.library.register_fake("llm2clip_fast::masked_mean_pool_forward", _pooled_fake)


_register_fake()
