"""Fused SigLIP loss (OpenCLIP ``SigLipLoss``) that never materialises the B x B logits.

With ``z_ij = s * <image_i, text_j> + b`` and the positive of image row ``i`` at text column
``i + offset`` (``y = +1`` there, ``-1`` elsewhere), the loss is
``sum_ij softplus(-y_ij * z_ij)`` divided by the number of images (OpenCLIP's convention).

Two backend-dispatched primitives do the O(M * N * D) work:

- :func:`siglip_forward_rows`: each image row's summed pair loss, (M,). One pass over the tiles:
  unlike CLIP there is no normaliser to find first.
- :func:`siglip_backward`: recomputes each tile once; returns d_image, d_text, d_scale and d_bias
  for per-row upstream weights.

``offset`` is what the distributed global-batch loss needs (a rank's images against every rank's
texts, its positives at its own global rows); the single-process loss uses 0.

Backends (op name ``siglip_loss``; force with ``backend=...`` or ``LLM2CLIP_BACKEND_SIGLIP_LOSS``):
``triton`` (CUDA; CPU only when forced under TRITON_INTERPRET=1), ``cpu`` (C++ extension, float32,
bfloat16, float16, float64), ``torch`` (chunked pure torch) and ``reference`` (materialises the
matrix; only when forced). ``LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS`` overrides the row-chunk
workspace size (elements of the C x N buffer).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._extensions import cpu_extension
from ._availability import (
    cpu_extension_reasons,
    cpu_has_fast_bf16,
    dtype_reasons,
    floating_dtype_reasons,
    reference_reasons,
    triton_half_or_float_reasons,
)
from ._backend import Backend, DispatchContext, record_selection, register_op, select_backend
from ._chunking import chunk_elements_from_env
from ._library import define_op
from .loss_inputs import check_bias, check_pair, check_scale

OP_NAME = "siglip_loss"
_REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ENV = "LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS"
# Row-chunk workspace, in elements of the C x N buffer: CPU 8M (32 MB fp32) keeps the buffer small
# next to the inputs while the at::mm calls stay large; CUDA 256M (512 MB bf16) keeps C large enough
# that the d_text accumulation per chunk does not make the backward memory-bound.
_CPU_CHUNK_ELEMENTS = 1 << 23
_CUDA_CHUNK_ELEMENTS = 1 << 28

_Quad = tuple[Tensor, Tensor, Tensor, Tensor]


def _chunk_elements(device: torch.device) -> int:
    from_env = chunk_elements_from_env(_CHUNK_ENV)
    if from_env is not None:
        return from_env
    return _CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CPU_CHUNK_ELEMENTS


def _chunk_rows(m: int, n: int, device: torch.device) -> int:
    return max(1, min(m, _chunk_elements(device) // max(n, 1)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positive_index(m: int, n: int, offset: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the positives that fall inside an (m, n) block.

    The range is computed on the host, not with a boolean mask: a mask gives a data-dependent size,
    which torch.compile cannot trace without breaking the graph."""
    lo, hi = max(0, -offset), max(0, min(m, n - offset))
    rows = torch.arange(lo, max(lo, hi), device=device)
    return rows, rows + offset


def _weights_column(row_weight: Tensor, r0: int, r1: int) -> Tensor:
    return row_weight if row_weight.dim() == 0 else row_weight[r0:r1, None]


# ---------------------------------------------------------------------------------------------
# torch backend: chunked, any device and float dtype, fp32 (fp64 for fp64) arithmetic.


def _signed_logits(image_chunk: Tensor, text_t: Tensor, s: Tensor, b: Tensor, r0: int, offset: int) -> _Quad:
    """Logits of a row chunk, their sign-flipped version -y*z, and the chunk's positive index."""
    dots = torch.mm(image_chunk, text_t)
    z = dots * s + b
    pr, pc = _positive_index(dots.shape[0], dots.shape[1], r0 + offset, dots.device)
    signed = z.clone()
    signed[pr, pc] = -signed[pr, pc]
    return dots, signed, pr, pc


def _torch_forward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int) -> Tensor:
    acc = _acc_dtype(image.dtype)
    m, n = image.shape[0], text.shape[0]
    text_t = text.to(acc).t()
    out = torch.empty(m, device=image.device, dtype=acc)
    step = _chunk_rows(m, n, image.device)
    for r0 in range(0, m, step):
        img = image[r0:r0 + step].to(acc)
        _, signed, _, _ = _signed_logits(img, text_t, s.to(acc), b.to(acc), r0, offset)
        out[r0:r0 + step] = F.softplus(signed).sum(dim=1)
    return out


def _torch_backward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor,
                    offset: int) -> _Quad:
    acc = _acc_dtype(image.dtype)
    m, n = image.shape[0], text.shape[0]
    s, b, row_weight = s.to(acc), b.to(acc), row_weight.to(acc)
    text_acc = text.to(acc)
    d_image = torch.empty(m, image.shape[1], device=image.device, dtype=acc)
    d_text = torch.zeros(n, image.shape[1], device=image.device, dtype=acc)
    d_scale = torch.zeros((), device=image.device, dtype=acc)
    d_bias = torch.zeros((), device=image.device, dtype=acc)
    step = _chunk_rows(m, n, image.device)
    for r0 in range(0, m, step):
        img = image[r0:r0 + step].to(acc)
        dots, signed, pr, pc = _signed_logits(img, text_acc.t(), s, b, r0, offset)
        # d softplus(-y z) / dz = -y * sigmoid(-y z)
        g = torch.sigmoid(signed)
        g[pr, pc] = -g[pr, pc]
        g.mul_(_weights_column(row_weight, r0, r0 + img.shape[0]))
        d_scale += (g * dots).sum()
        d_bias += g.sum()
        torch.mm(g, text_acc, out=d_image[r0:r0 + step])
        d_text.addmm_(g.t(), img)
    return d_image.mul_(s), d_text.mul_(s), d_scale, d_bias


# ---------------------------------------------------------------------------------------------
# reference backend: the materialised formula (tests, debugging).


def _reference_forward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int) -> Tensor:
    acc = _acc_dtype(image.dtype)
    z = s.to(acc) * image.to(acc) @ text.to(acc).t() + b.to(acc)
    y = -torch.ones_like(z)
    pr, pc = _positive_index(z.shape[0], z.shape[1], offset, z.device)
    y[pr, pc] = 1.0
    return -F.logsigmoid(y * z).sum(dim=1)


def _reference_backward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor,
                        offset: int) -> _Quad:
    acc = _acc_dtype(image.dtype)
    with torch.enable_grad():
        img = image.to(acc).detach().requires_grad_()
        txt = text.to(acc).detach().requires_grad_()
        s_ = s.to(acc).detach().requires_grad_()
        b_ = b.to(acc).detach().requires_grad_()
        rows = _reference_forward(img, txt, s_, b_, offset)
        total = (rows * row_weight.to(acc)).sum()
        return torch.autograd.grad(total, (img, txt, s_, b_))


# ---------------------------------------------------------------------------------------------
# cpu backend: llm2clip_fast._C (torch.ops.llm2clip_fast.siglip_loss_*).


def _cpu_operands(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    # bf16 GEMMs pay only with native bf16 units (AVX512-BF16/AMX); elsewhere they are emulated
    # several times slower than fp32, so the chunks are multiplied in fp32 there. fp16 GEMMs on CPU
    # are slow everywhere.
    if (image.dtype == torch.bfloat16 and not cpu_has_fast_bf16()) or image.dtype == torch.float16:
        return image.float(), text.float()
    return image, text


def _cpu_forward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int) -> Tensor:
    image, text = _cpu_operands(image, text)
    rows = _chunk_rows(image.shape[0], text.shape[0], image.device)
    return torch.ops.llm2clip_fast.siglip_loss_forward(image, text, s, b, offset, rows)


def _cpu_backward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor,
                  offset: int) -> _Quad:
    image, text = _cpu_operands(image, text)
    rows = _chunk_rows(image.shape[0], text.shape[0], image.device)
    return torch.ops.llm2clip_fast.siglip_loss_backward(image, text, s, b, row_weight, offset, rows)


def _register_cpu_fakes() -> None:
    """Shape-only versions of the C++ ops, so torch.compile / opcheck can trace them."""
    if cpu_extension() is None or not hasattr(torch.ops.llm2clip_fast, "siglip_loss_forward"):
        return

    @torch.library.register_fake("llm2clip_fast::siglip_loss_forward")
    def _(image, text, scale, bias, offset, chunk_rows):
        return _rows_fake(image, text, scale, bias, offset)

    @torch.library.register_fake("llm2clip_fast::siglip_loss_backward")
    def _(image, text, scale, bias, row_weight, offset, chunk_rows):
        return _grads_fake(image, text, scale, bias, row_weight, offset)


_register_cpu_fakes()


def _cpu_op_reasons(ctx: DispatchContext) -> list[str]:
    why = cpu_extension_reasons(ctx) + dtype_reasons(
        ctx, (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    )
    if not why and not hasattr(torch.ops.llm2clip_fast, "siglip_loss_forward"):
        why.append("llm2clip_fast._C was built without the siglip_loss ops; rebuild with "
                   "`python setup.py build_ext --inplace`")
    return why


# ---------------------------------------------------------------------------------------------
# triton backend: llm2clip_kernels/siglip_loss.py.


def _rows_fake(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int) -> Tensor:
    return image.new_empty(image.shape[0], dtype=_acc_dtype(image.dtype))


def _grads_fake(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor,
                offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = _acc_dtype(image.dtype)
    return (image.new_empty(image.shape, dtype=acc), text.new_empty(text.shape, dtype=acc),
            image.new_empty((), dtype=acc), image.new_empty((), dtype=acc))


def _triton_forward_impl(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int) -> Tensor:
    from ..kernels.siglip_loss import siglip_forward_rows

    # A custom op's output must own its storage (the launcher may return a view of its workspace).
    return siglip_forward_rows(image, text, s, b, offset).clone()


def _triton_backward_impl(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor,
                          offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.siglip_loss import siglip_backward

    workspace = _chunk_elements(image.device) * image.element_size()
    d_image, d_text, d_scale, d_bias = siglip_backward(image, text, s, b, row_weight, offset,
                                                       workspace_bytes=workspace)
    # d_scale and d_bias are views of one buffer; outputs of a custom op must not alias.
    return d_image, d_text, d_scale.clone(), d_bias.clone()


# torch.library ops (llm2clip_fast::siglip_*_triton): torch.compile traces a loss that calls them
# without a graph break, and Inductor sees their kernels (see ops/_library.py).
_triton_forward = define_op("siglip_forward_triton", _triton_forward_impl, _rows_fake, triton=True)
_triton_backward = define_op("siglip_backward_triton", _triton_backward_impl, _grads_fake, triton=True)


class SigLipImpl(NamedTuple):
    """A backend's pair of primitives (see :func:`siglip_forward_rows` / :func:`siglip_backward`)."""

    forward: Any
    backward: Any


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    return (torch.zeros(4, 8, device=device, dtype=dtype), torch.zeros(4, 8, device=device, dtype=dtype))


register_op(
    OP_NAME,
    [
        Backend("triton", SigLipImpl(_triton_forward, _triton_backward),
                functools.partial(triton_half_or_float_reasons, module="siglip_loss"),
                "Triton tiles: one-pass forward; backward recompute into a chunk workspace + cuBLAS GEMMs"),
        Backend("cpu", SigLipImpl(_cpu_forward, _cpu_backward), _cpu_op_reasons,
                "C++: at::mm row chunks with a fused OpenMP epilogue"),
        Backend("torch", SigLipImpl(_torch_forward, _torch_backward), floating_dtype_reasons,
                "chunked pure torch"),
        Backend("reference", SigLipImpl(_reference_forward, _reference_backward), reference_reasons,
                "materialised formula (ops/reference.py); forced only"),
    ],
    description="sigmoid (SigLIP) loss without the B x B matrix",
    probe=_probe,
)


# ---------------------------------------------------------------------------------------------
# input checks


def _check_offset(offset: Any) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    return offset


def _check_primitive_inputs(image: Tensor, text: Tensor) -> None:
    check_pair(image, text, "image", "text", same_batch=False)
    if image.dtype != text.dtype:
        raise TypeError(f"image and text must share a dtype, got {image.dtype} and {text.dtype}")


def _select(image: Tensor, text: Tensor, backend: str | None) -> Backend:
    return record_selection(OP_NAME, select_backend(OP_NAME, [image, text], backend=backend))


# ---------------------------------------------------------------------------------------------
# public primitives


def siglip_forward_rows(
    image: Tensor, text: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float, *,
    offset: int = 0, backend: str | None = None,
) -> Tensor:
    """Each image row's summed SigLIP pair loss, without the (M, N) logit matrix.

    image: (M, D), text: (N, D), M != N allowed, same floating dtype and device. The positive of
    row i is column ``i + offset`` (none if that falls outside [0, N)). Returns
    ``sum_j softplus(-y_ij * (s * <image_i, text_j> + b))``, (M,) float32 (float64 for float64
    inputs). No autograd.
    """
    _check_primitive_inputs(image, text)
    s = check_scale(logit_scale, image.device).detach()
    b = check_bias(logit_bias, image.device).detach()
    impl = _select(image, text, backend).run
    return impl.forward(image.detach().contiguous(), text.detach().contiguous(), s, b, _check_offset(offset))


def siglip_backward(
    image: Tensor, text: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float,
    row_weight: Tensor, *, offset: int = 0, backend: str | None = None,
) -> _Quad:
    """Gradients of ``sum_i row_weight_i * rows_i`` (rows from :func:`siglip_forward_rows`).

    row_weight: a 0-dim tensor (the same weight for every row) or an (M,) tensor. Returns
    d_image (M, D), d_text (N, D), d_scale and d_bias (0-dim), float32 (float64 for float64
    inputs), recomputing the tiles once. No autograd.
    """
    _check_primitive_inputs(image, text)
    m = image.shape[0]
    if not isinstance(row_weight, Tensor) or row_weight.shape not in ((), (m,)):
        shape = tuple(row_weight.shape) if isinstance(row_weight, Tensor) else type(row_weight).__name__
        raise ValueError(f"row_weight must be a 0-dim tensor or have shape ({m},), got {shape}")
    if row_weight.device != image.device:
        raise ValueError(f"row_weight is on {row_weight.device} but image is on {image.device}")
    s = check_scale(logit_scale, image.device).detach()
    b = check_bias(logit_bias, image.device).detach()
    impl = _select(image, text, backend).run
    weight = row_weight.detach().to(_acc_dtype(image.dtype)).contiguous()
    return impl.backward(image.detach().contiguous(), text.detach().contiguous(), s, b, weight,
                         _check_offset(offset))


# ---------------------------------------------------------------------------------------------
# the loss


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return rows.sum() / rows.shape[0]
    if reduction == "sum":
        return rows.sum()
    return rows


def row_weights_for(grad_out: Tensor, reduction: str, m: int) -> Tensor:
    """Per-row upstream weights of ``reduction`` over m rows: 0-dim for mean/sum, (m,) for none."""
    if reduction == "mean":
        return grad_out.reshape(()) / m
    if reduction == "sum":
        return grad_out.reshape(())
    return grad_out


class _SigLipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, reduction: str,
                impl: SigLipImpl) -> Tensor:
        acc = _acc_dtype(image.dtype)
        s = scale.detach().to(acc)
        b = bias.detach().to(acc)
        rows = impl.forward(image, text, s, b, 0)
        ctx.save_for_backward(image, text, s, b)
        ctx.reduction = reduction
        ctx.impl = impl
        ctx.param_dtypes = (scale.dtype, bias.dtype)
        return _reduce(rows, reduction)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        image, text, s, b = ctx.saved_tensors
        weight = row_weights_for(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
        d_image, d_text, d_scale, d_bias = ctx.impl.backward(image, text, s, b, weight, 0)
        need = ctx.needs_input_grad
        return (
            d_image.to(image.dtype) if need[0] else None,
            d_text.to(text.dtype) if need[1] else None,
            d_scale.to(ctx.param_dtypes[0]) if need[2] else None,
            d_bias.to(ctx.param_dtypes[1]) if need[3] else None,
            None,
            None,
        )


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    reduction: str = "mean",
    backend: str | None = None,
    distributed: bool = False,
    process_group: Any = None,
) -> Tensor:
    """Sigmoid loss of OpenCLIP's ``SigLipLoss``, without materialising the B x B logits.

    ``z = logit_scale * image @ text.T + logit_bias``; the loss is the sum over all pairs of
    ``-logsigmoid(y * z)`` (y = +1 on the diagonal, -1 elsewhere) divided by B.

    Args:
        image_features: (B, D) float tensor (float32, float16, bfloat16 or float64).
        text_features: (B, D) float tensor on the same device; a different float dtype is promoted.
        logit_scale: the multiplier (already exponentiated): a positive 0-dim tensor (gets a
            gradient) or a positive float.
        logit_bias: the additive bias: a finite 0-dim tensor (gets a gradient) or a float.
        reduction: 'mean' (OpenCLIP's value: total / B), 'sum', or 'none' for the (B,) per-image
            row sums.
        backend: force a backend ('triton', 'cpu', 'torch', 'reference'); default automatic.
        distributed: compute the global-batch loss across the ranks of ``process_group`` (the
            default group when None); each rank passes its local features. See
            :func:`llm2clip_fast.ops.global_batch_losses.siglip_loss_global` for the exact convention.
            Passing a ``process_group`` implies ``distributed=True``.

    Returns:
        The loss in float32 (float64 for float64 inputs). Gradients flow to both feature tensors
        and to tensor ``logit_scale`` / ``logit_bias``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if distributed or process_group is not None:
        from .global_batch_losses import siglip_loss_global

        return siglip_loss_global(image_features, text_features, logit_scale, logit_bias,
                                  reduction=reduction, process_group=process_group, backend=backend)
    check_pair(image_features, text_features, "image_features", "text_features", same_batch=True)
    if image_features.dtype != text_features.dtype:
        common = torch.promote_types(image_features.dtype, text_features.dtype)
        image_features, text_features = image_features.to(common), text_features.to(common)
    scale = check_scale(logit_scale, image_features.device)
    bias = check_bias(logit_bias, image_features.device)
    chosen = _select(image_features, text_features, backend)
    return _SigLipLossFunction.apply(image_features.contiguous(), text_features.contiguous(), scale, bias,
                                     reduction, chosen.run)
