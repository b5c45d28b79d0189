"""Fused CLIP contrastive loss (OpenCLIP ``ClipLoss``) that never materialises the B x B logits.

Two backend-dispatched primitives do the O(B^2 * D) work; everything else is O(B * D) torch:

- :func:`clip_lse_forward`: row and column log-sum-exp of ``s * image @ text.T``.
- :func:`clip_lse_backward`: with ``G = row_coef * softmax_rows + col_coef * softmax_cols`` (each
  softmax written through the saved LSEs), ``d_image = s * G @ text``, ``d_text = s * G.T @ image``
  and ``d_scale = sum G * l``.

:func:`clip_loss` composes them with the positive-pair (diagonal) terms:
``loss_i = (row_lse_i + col_lse_i) / 2 - s * <image_i, text_i>``.

Backends (op name ``clip_loss``; force with ``backend=...`` or ``LLM2CLIP_BACKEND_CLIP_LOSS``):
``triton`` (CUDA tensors; CPU only when forced under TRITON_INTERPRET=1), ``cpu`` (C++ extension,
float32/bfloat16/float64; its epilogue runs the AVX-512, AVX2 or baseline build the CPU supports,
or the one ``LLM2CLIP_CPU_ISA`` names), ``torch`` (chunked pure torch, any device and float dtype) and
``reference`` (materialises the matrix; only when forced). ``LLM2CLIP_CLIP_LOSS_CHUNK_ELEMENTS``
overrides the row-chunk workspace size (elements of the C x N buffer).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._extensions import cpu_extension
from ..fp32_matmul import mm_fp32
from ._availability import (
    cpu_extension_reasons,
    dtype_reasons,
    floating_dtype_reasons,
    reference_reasons,
    triton_half_or_float_reasons,
)
from ._backend import Backend, DispatchContext, record_selection, register_op, select_backend
from ._chunking import chunk_elements_from_env
from ._library import define_op
from .loss_inputs import check_pair, check_scale
from .reference import clip_loss_reference

OP_NAME = "clip_loss"
_REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ENV = "LLM2CLIP_CLIP_LOSS_CHUNK_ELEMENTS"
# Row-chunk workspace (the C x N buffer). CPU: 8M elements (32 MB fp32) keeps the buffer cheap
# next to the inputs while the at::mm calls stay large. CUDA: 2 GiB, because every chunk adds an
# N x D update into d_text; at B = 2^20, D = 1024 that is ~12 GB of memory traffic per chunk, so C
# must be ~1000 rows for the backward to stay compute-bound.
_CPU_CHUNK_ELEMENTS = 1 << 23
_CUDA_CHUNK_BYTES = 2 << 30
_MIN_CHUNK_ROWS_CUDA = 128

_Pair = tuple[Tensor, Tensor]
_Triple = tuple[Tensor, Tensor, Tensor]


def _chunk_elements(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    from_env = chunk_elements_from_env(_CHUNK_ENV)
    if from_env is not None:
        return from_env
    if device.type == "cuda":
        return _CUDA_CHUNK_BYTES // torch.empty((), dtype=dtype).element_size()
    return _CPU_CHUNK_ELEMENTS


def _chunk_rows(m: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    rows = _chunk_elements(device, dtype) // max(n, 1)
    if device.type == "cuda":
        rows = max(rows, _MIN_CHUNK_ROWS_CUDA)
    return max(1, min(rows, m))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# torch backend: chunked, any device and float dtype, fp32 (fp64 for fp64) arithmetic.


def _torch_lse_forward(image: Tensor, text: Tensor, scale: Tensor) -> _Pair:
    acc = _acc_dtype(image.dtype)
    m, n = image.shape[0], text.shape[0]
    s = scale.to(acc)
    text_t = text.to(acc).t()
    row_lse = torch.empty(m, device=image.device, dtype=acc)
    col_lse = torch.full((n,), float("-inf"), device=image.device, dtype=acc)
    step = _chunk_rows(m, n, image.device)
    for r0 in range(0, m, step):
        x = torch.mm(image[r0:r0 + step].to(acc), text_t).mul_(s)
        row_lse[r0:r0 + step] = torch.logsumexp(x, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(x, dim=0))
    return row_lse, col_lse


def _torch_lse_backward(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor,
) -> _Triple:
    acc = _acc_dtype(image.dtype)
    m, n = image.shape[0], text.shape[0]
    s = scale.to(acc)
    text_acc = text.to(acc)
    col_lse = col_lse.to(acc)
    col_coef = col_coef.to(acc)
    d_image = torch.empty(m, image.shape[1], device=image.device, dtype=acc)
    d_text = torch.zeros(n, image.shape[1], device=image.device, dtype=acc)
    d_scale = torch.zeros((), device=image.device, dtype=acc)
    step = _chunk_rows(m, n, image.device)
    for r0 in range(0, m, step):
        img = image[r0:r0 + step].to(acc)
        logits = torch.mm(img, text_acc.t())
        x = logits * s
        g = (row_coef[r0:r0 + step, None].to(acc) * torch.exp(x - row_lse[r0:r0 + step, None].to(acc))
             + col_coef[None, :] * torch.exp(x - col_lse[None, :]))
        d_scale += (g * logits).sum()
        torch.mm(g, text_acc, out=d_image[r0:r0 + step])
        d_text.addmm_(g.t(), img)
    return d_image.mul_(s), d_text.mul_(s), d_scale


# ---------------------------------------------------------------------------------------------
# reference backend: the materialised formula (tests, debugging).


def _reference_lse_forward(image: Tensor, text: Tensor, scale: Tensor) -> _Pair:
    acc = _acc_dtype(image.dtype)
    x = scale.to(acc) * image.to(acc) @ text.to(acc).t()
    return torch.logsumexp(x, dim=1), torch.logsumexp(x, dim=0)


def _reference_lse_backward(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor,
) -> _Triple:
    acc = _acc_dtype(image.dtype)
    s = scale.to(acc)
    img, txt = image.to(acc), text.to(acc)
    logits = img @ txt.t()
    x = s * logits
    g = (row_coef.to(acc)[:, None] * torch.exp(x - row_lse.to(acc)[:, None])
         + col_coef.to(acc)[None, :] * torch.exp(x - col_lse.to(acc)[None, :]))
    return s * g @ txt, s * g.t() @ img, (g * logits).sum()


# ---------------------------------------------------------------------------------------------
# cpu backend: llm2clip_fast._C (torch.ops.llm2clip_fast.clip_lse_*).


# bf16 features: the C++ op multiplies float32 copies of them (csrc/cpu/clip_loss.cpp says why),
# so its gradients are as exact as the torch backend's.
def _cpu_lse_forward(image: Tensor, text: Tensor, scale: Tensor) -> _Pair:
    return torch.ops.llm2clip_fast.clip_lse_forward(image, text, scale, _chunk_elements(image.device))


def _cpu_lse_backward(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor,
) -> _Triple:
    return torch.ops.llm2clip_fast.clip_lse_backward(
        image, text, scale, row_lse, col_lse, row_coef, col_coef, _chunk_elements(image.device)
    )


def _register_cpu_fakes() -> None:
    """Shape-only versions of the C++ ops, so torch.compile / opcheck can trace them."""
    if cpu_extension() is None or not hasattr(torch.ops.llm2clip_fast, "clip_lse_forward"):
        return

    @torch.library.register_fake("llm2clip_fast::clip_lse_forward")
    def _(image, text, logit_scale, chunk_elements):
        return _lse_forward_fake(image, text, logit_scale)

    @torch.library.register_fake("llm2clip_fast::clip_lse_backward")
    def _(image, text, logit_scale, row_lse, col_lse, row_coef, col_coef, chunk_elements):
        return _lse_backward_fake(image, text, logit_scale, row_lse, col_lse, row_coef, col_coef)


_register_cpu_fakes()


def _cpu_op_reasons(ctx: DispatchContext) -> list[str]:
    why = cpu_extension_reasons(ctx) + dtype_reasons(ctx, (torch.float32, torch.bfloat16, torch.float64))
    if not why and not hasattr(torch.ops.llm2clip_fast, "clip_lse_forward"):
        why.append("llm2clip_fast._C was built without the clip_lse ops; rebuild with "
                   "`python setup.py build_ext --inplace`")
    return why


# ---------------------------------------------------------------------------------------------
# triton backend: llm2clip_kernels/clip_loss.py for the tiles, torch.mm (cuBLAS) for the gradient GEMMs.


def _triton_lse_forward_impl(image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    from ..kernels.clip_loss import clip_lse_forward_triton

    return clip_lse_forward_triton(image, text, scale.to(torch.float32))


def _lse_forward_fake(image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    acc = _acc_dtype(image.dtype)
    return image.new_empty(image.shape[0], dtype=acc), text.new_empty(text.shape[0], dtype=acc)


def _lse_backward_fake(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = _acc_dtype(image.dtype)
    return (image.new_empty(image.shape, dtype=acc), text.new_empty(text.shape, dtype=acc),
            image.new_empty((), dtype=acc))


def _triton_lse_backward_impl(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.clip_loss import clip_grad_chunk_triton

    m, d = image.shape
    n = text.shape[0]
    s = scale.to(torch.float32)
    row_coef = row_coef.to(torch.float32)
    col_coef = col_coef.to(torch.float32)
    # G is stored in the input dtype; dividing the coefficients by their largest magnitude keeps
    # G in [0, 2] so fp16 does not flush the many small off-diagonal entries to zero.
    norm = torch.maximum(row_coef.abs().max(), col_coef.abs().max())
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    row_coef = (row_coef / norm).contiguous()
    col_coef = (col_coef / norm).contiguous()
    row_lse = row_lse.to(torch.float32).contiguous()
    col_lse = col_lse.to(torch.float32).contiguous()
    step = _chunk_rows(m, n, image.device, image.dtype)
    g_ws = torch.empty(step, n, device=image.device, dtype=image.dtype)
    d_image = torch.empty(m, d, device=image.device, dtype=torch.float32)
    d_text = torch.zeros(n, d, device=image.device, dtype=torch.float32)
    d_scale = torch.zeros((), device=image.device, dtype=torch.float32)
    for r0 in range(0, m, step):
        rows = min(step, m - r0)
        img = image[r0:r0 + rows]
        g = g_ws[:rows]
        d_scale += clip_grad_chunk_triton(img, text, s, row_lse[r0:r0 + rows], col_lse,
                                          row_coef[r0:r0 + rows], col_coef, g)
        d_image[r0:r0 + rows] = mm_fp32(g, text)
        if g.dtype == torch.float32:
            d_text.addmm_(g.t(), img)
        else:
            d_text += mm_fp32(g.t(), img)
    factor = s * norm
    return d_image.mul_(factor), d_text.mul_(factor), d_scale * norm


# torch.library ops (llm2clip_fast::clip_lse_*_triton): torch.compile traces a loss that calls them
# without a graph break, and Inductor sees their kernels (see ops/_library.py).
_triton_lse_forward = define_op("clip_lse_forward_triton", _triton_lse_forward_impl, _lse_forward_fake,
                                triton=True)
_triton_lse_backward = define_op("clip_lse_backward_triton", _triton_lse_backward_impl, _lse_backward_fake,
                                 triton=True)


class ClipLseImpl(NamedTuple):
    """A backend's pair of primitives (see :func:`clip_lse_forward` / :func:`clip_lse_backward`)."""

    forward: Any
    backward: Any


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    return (torch.zeros(4, 8, device=device, dtype=dtype), torch.zeros(4, 8, device=device, dtype=dtype))


register_op(
    OP_NAME,
    [
        Backend("triton", ClipLseImpl(_triton_lse_forward, _triton_lse_backward),
                functools.partial(triton_half_or_float_reasons, module="clip_loss"),
                "Triton tiles: one-pass row+column LSE; backward recompute + cuBLAS GEMMs"),
        Backend("cpu", ClipLseImpl(_cpu_lse_forward, _cpu_lse_backward), _cpu_op_reasons,
                "C++: at::mm row chunks with a fused OpenMP epilogue"),
        Backend("torch", ClipLseImpl(_torch_lse_forward, _torch_lse_backward), floating_dtype_reasons,
                "chunked pure torch"),
        Backend("reference", ClipLseImpl(_reference_lse_forward, _reference_lse_backward), reference_reasons,
                "materialised formula (ops/reference.py); forced only"),
    ],
    description="symmetric InfoNCE (CLIP) loss without the B x B matrix",
    probe=_probe,
)


# ---------------------------------------------------------------------------------------------
# input checks


def _select(image: Tensor, text: Tensor, backend: str | None) -> Backend:
    return record_selection(OP_NAME, select_backend(OP_NAME, [image, text], backend=backend))


# ---------------------------------------------------------------------------------------------
# public primitives


def clip_lse_forward(
    image: Tensor, text: Tensor, logit_scale: Tensor, *, backend: str | None = None
) -> _Pair:
    """Row and column log-sum-exp of ``logit_scale * image @ text.T``, without the (M, N) matrix.

    image: (M, D), text: (N, D), M != N allowed, same floating dtype and device. logit_scale: 0-dim
    tensor (the multiplier s). Returns ``row_lse`` (M,) and ``col_lse`` (N,) in float32 (float64
    for float64 inputs). Extra memory: O((M + N) * D + M + N) plus a bounded tile workspace. No
    autograd.
    """
    check_pair(image, text, "image", "text", same_batch=False)
    if image.dtype != text.dtype:
        raise TypeError(f"image and text must share a dtype, got {image.dtype} and {text.dtype}")
    scale = check_scale(logit_scale, image.device).detach()
    impl = _select(image, text, backend).run
    return impl.forward(image.detach().contiguous(), text.detach().contiguous(), scale)


def clip_lse_backward(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    row_coef: Tensor,
    col_coef: Tensor,
    *,
    backend: str | None = None,
) -> _Triple:
    """Gradient contraction of the CLIP LSE terms, recomputing the similarity tiles.

    With ``l = image @ text.T`` and
    ``G_ij = row_coef_i * exp(s*l_ij - row_lse_i) + col_coef_j * exp(s*l_ij - col_lse_j)``
    returns ``d_image = s * G @ text`` (M, D), ``d_text = s * G.T @ image`` (N, D) and
    ``d_scale = sum_ij G_ij * l_ij`` (0-dim), all float32 (float64 for float64 inputs).
    row_lse, row_coef: (M,); col_lse, col_coef: (N,). No autograd.
    """
    check_pair(image, text, "image", "text", same_batch=False)
    if image.dtype != text.dtype:
        raise TypeError(f"image and text must share a dtype, got {image.dtype} and {text.dtype}")
    m, n = image.shape[0], text.shape[0]
    for name, t, size in (("row_lse", row_lse, m), ("col_lse", col_lse, n), ("row_coef", row_coef, m),
                          ("col_coef", col_coef, n)):
        if not isinstance(t, Tensor) or t.shape != (size,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape ({size},), got {shape}")
        if t.device != image.device:
            raise ValueError(f"{name} is on {t.device} but image is on {image.device}")
    scale = check_scale(logit_scale, image.device).detach()
    impl = _select(image, text, backend).run
    return impl.backward(image.detach().contiguous(), text.detach().contiguous(), scale,
                         row_lse.detach().contiguous(), col_lse.detach().contiguous(),
                         row_coef.detach().contiguous(), col_coef.detach().contiguous())


# ---------------------------------------------------------------------------------------------
# the loss


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


class _ClipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, image: Tensor, text: Tensor, scale: Tensor, reduction: str,
                impl: ClipLseImpl) -> Tensor:
        acc = _acc_dtype(image.dtype)
        s = scale.detach().to(acc)
        row_lse, col_lse = impl.forward(image, text, s)
        # Positive pairs: the diagonal <image_i, text_i>, O(B * D).
        diag = torch.einsum("bd,bd->b", image.to(acc), text.to(acc))
        per_sample = 0.5 * (row_lse + col_lse) - s * diag
        ctx.save_for_backward(image, text, s, row_lse, col_lse, diag)
        ctx.reduction = reduction
        ctx.impl = impl
        ctx.scale_dtype = scale.dtype
        return _reduce(per_sample, reduction)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        image, text, s, row_lse, col_lse, diag = ctx.saved_tensors
        acc = s.dtype
        b = image.shape[0]
        grad_out = grad_out.to(acc)
        if ctx.reduction == "mean":
            g = (grad_out / b).expand(b)
        elif ctx.reduction == "sum":
            g = grad_out.expand(b)
        else:
            g = grad_out
        coef = (0.5 * g).contiguous()
        d_image, d_text, d_scale = ctx.impl.backward(image, text, s, row_lse, col_lse, coef, coef)
        # Positive-pair terms, in place: no extra (B, D) temporaries next to the gradients.
        gs = (g * s)[:, None]
        d_image.addcmul_(gs, text.to(acc), value=-1)
        d_text.addcmul_(gs, image.to(acc), value=-1)
        d_scale = d_scale - (g * diag).sum()
        return (
            d_image.to(image.dtype) if ctx.needs_input_grad[0] else None,
            d_text.to(text.dtype) if ctx.needs_input_grad[1] else None,
            d_scale.to(ctx.scale_dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
        )


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    reduction: str = "mean",
    backend: str | None = None,
    distributed: bool = False,
    process_group: Any = None,
) -> Tensor:
    """Symmetric InfoNCE loss of OpenCLIP's ``ClipLoss``, without materialising the B x B logits.

    Args:
        image_features: (B, D) float tensor (float32, float16, bfloat16 or float64).
        text_features: (B, D) float tensor on the same device; a different float dtype is promoted.
        logit_scale: the multiplier s (already exponentiated): a positive 0-dim (or one-element)
            tensor, which receives a gradient, or a positive Python float (no gradient).
        reduction: 'mean' (OpenCLIP's value), 'sum', or 'none' for the per-sample (B,) losses
            ``(CE(logits[i], i) + CE(logits.T[i], i)) / 2``.
        backend: force a backend ('triton', 'cpu', 'torch', 'reference'); default automatic.
        distributed: compute the global-batch loss across the ranks of ``process_group`` (the
            default group when None); each rank passes its local features. See
            :func:`llm2clip_fast.ops.global_batch_losses.clip_loss_global` for the exact convention.
            Passing a ``process_group`` implies ``distributed=True``.

    Returns:
        The loss in float32 (float64 for float64 inputs), whatever the features' dtype.
        Gradients flow to both feature tensors and to a tensor ``logit_scale``.

    On CUDA the positivity of a tensor ``logit_scale`` is checked with an asynchronous device
    assertion (no host sync); on CPU it raises ValueError at once.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if distributed or process_group is not None:
        from .global_batch_losses import clip_loss_global

        return clip_loss_global(image_features, text_features, logit_scale, reduction=reduction,
                                process_group=process_group, backend=backend)
    check_pair(image_features, text_features, "image_features", "text_features", same_batch=True)
    if image_features.dtype != text_features.dtype:
        common = torch.promote_types(image_features.dtype, text_features.dtype)
        image_features, text_features = image_features.to(common), text_features.to(common)
    scale = check_scale(logit_scale, image_features.device)
    chosen = _select(image_features, text_features, backend)
    if chosen.name == "reference":
        out = clip_loss_reference(image_features, text_features, scale, reduction=reduction)
        return out.double() if image_features.dtype == torch.float64 else out
    return _ClipLossFunction.apply(image_features.contiguous(), text_features.contiguous(), scale, reduction,
                                   chosen.run)
