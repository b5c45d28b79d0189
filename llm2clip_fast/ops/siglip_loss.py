"""Fused SigLIP loss (OpenCLIP ``SigLipLoss``) that never materialises the B x B logits.

With ``z_ij = s * <image_i, text_j> + b`` and the positive of image row ``i`` at text column
``i + offset`` (``y = +1`` there, ``-1`` elsewhere), the loss is
``sum_ij softplus(-y_ij * z_ij)`` divided by the number of images (OpenCLIP's convention).

The logits are walked in row chunks (a C x N workspace): a GEMM per chunk (cuBLAS with an fp32 result
on CUDA) and an epilogue over it. SigLIP has no normaliser, so two paths (ops/_chunking.py records
which ran, ``last_path("siglip_loss")``):

- ``one-pass``: gradients needed and reduction 'mean' or 'sum': the forward computes each chunk's
  loss and its logit gradient in the same epilogue, then both gradient GEMMs; the backward only
  rescales what the forward saved (O(B * D)). 6 * B^2 * D FLOPs in all.
- ``two-pass``: reduction 'none' or no gradients: the forward computes the loss alone, the backward
  recomputes each chunk with the per-row upstream weights (8 * B^2 * D with a backward).

Primitives (backend-dispatched):

- :func:`siglip_forward_rows`: each image row's summed pair loss, (M,).
- :func:`siglip_backward`: recomputes each tile once; d_image, d_text, d_scale, d_bias for per-row
  upstream weights.
- :func:`siglip_forward_backward`: rows and the gradients of their plain sum, from one pass.

``offset`` is what the distributed global-batch loss needs (a rank's images against every rank's
texts, its positives at its own global rows); the single-process loss uses 0.

Backends (op name ``siglip_loss``; force with ``backend=...`` or ``LLM2CLIP_BACKEND_SIGLIP_LOSS``):
``triton`` (CUDA: cuBLAS GEMMs and a Triton epilogue, overlapped on a second stream; CPU only when
forced under TRITON_INTERPRET=1), ``cpu`` (C++ extension, float32, bfloat16, float16, float64),
``torch`` (the same chunks in pure torch) and ``reference`` (materialises the matrix; only when
forced). ``LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS`` sets the preferred chunk workspace (elements of the
C x N buffer); the memory budget (``memory_budget=``, ``LLM2CLIP_LOSS_MEMORY_BUDGET``) caps it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .._extensions import cpu_extension
from ..distributed import reduce_scatter_rows
from ._availability import (
    cpu_extension_reasons,
    cpu_has_fast_bf16,
    dtype_reasons,
    floating_dtype_reasons,
    reference_reasons,
    triton_half_or_float_reasons,
)
from ._backend import Backend, DispatchContext, record_selection, register_op, registered_ops, select_backend
from ._chunk_schedule import run_gradient_chunks, run_logit_chunks
from ._chunking import ChunkPlan, chunk_elements_from_env, memory_budget, plan_chunks, record_path
from ._library import define_op
from ._overlap import overlap_enabled
from .global_batch_ring import (
    Ring,
    checked_features,
    local_batch_sizes,
    ring_over_text_pieces,
    ring_reduce_scatter,
)
from .loss_inputs import check_bias, check_pair, check_scale

OP_NAME = "siglip_loss"
ONE_PASS = "one-pass"
TWO_PASS = "two-pass"
_REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ENV = "LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS"
# Preferred chunk workspace, in elements of the C x N buffer: CPU 8M (32 MB fp32) keeps the buffer
# small next to the inputs while the at::mm calls stay large; CUDA 2^29 (C = 8192 rows at B = 65536)
# keeps C large enough that the d_text accumulation per chunk does not make the backward memory-bound.
_CPU_CHUNK_ELEMENTS = 1 << 23
_CUDA_CHUNK_ELEMENTS = 1 << 29
_MIN_CHUNK_ROWS_CUDA = 128

_Quad = tuple[Tensor, Tensor, Tensor, Tensor]
_Five = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_bytes(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def _positive_index(m: int, n: int, offset: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the positives that fall inside an (m, n) block.

    The range is computed on the host, not with a boolean mask: a mask gives a data-dependent size,
    which torch.compile cannot trace without breaking the graph."""
    lo, hi = max(0, -offset), max(0, min(m, n - offset))
    rows = torch.arange(lo, max(lo, hi), device=device)
    return rows, rows + offset


# ---------------------------------------------------------------------------------------------
# torch backend: the chunk schedule with torch epilogues, any device and float dtype, fp32 (fp64 for
# fp64) arithmetic and operands.


def _signed_logits(chunk: Tensor, s: Tensor, b: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """-y * z of a logit chunk whose row 0 has its positive at column ``offset``, and that positive index."""
    signed = chunk * s + b
    pr, pc = _positive_index(chunk.shape[0], chunk.shape[1], offset, chunk.device)
    signed[pr, pc] = -signed[pr, pc]
    return signed, pr, pc


def _torch_forward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int, chunk_rows: int) -> Tensor:
    acc = _acc_dtype(image.dtype)
    s, b = s.to(acc), b.to(acc)
    out = image.new_empty(image.shape[0], dtype=acc)

    def epilogue(chunk: Tensor, r0: int, r1: int) -> None:
        signed, _, _ = _signed_logits(chunk, s, b, r0 + offset)
        out[r0:r1] = F.softplus(signed).sum(dim=1)

    run_logit_chunks(image.to(acc), text.to(acc), chunk_rows, False, acc, epilogue)
    return out


def _torch_gradients(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor, offset: int,
                     chunk_rows: int, with_loss: bool) -> _Five:
    acc = _acc_dtype(image.dtype)
    s, b, row_weight = s.to(acc), b.to(acc), row_weight.to(acc)
    uniform = row_weight.dim() == 0
    rows_out = image.new_empty(image.shape[0] if with_loss else 0, dtype=acc)
    sums = image.new_zeros(2, dtype=acc)

    def epilogue(chunk: Tensor, g: Tensor, r0: int, r1: int) -> None:
        signed, pr, pc = _signed_logits(chunk, s, b, r0 + offset)
        if with_loss:
            rows_out[r0:r1] = F.softplus(signed).sum(dim=1)
        # d softplus(-y z) / dz = -y * sigmoid(-y z)
        torch.sigmoid(signed, out=g)
        g[pr, pc] = -g[pr, pc]
        w = row_weight if uniform else row_weight[r0:r1, None]
        weighted = g * w
        sums[0] += torch.dot(weighted.reshape(-1), chunk.reshape(-1))
        sums[1] += weighted.sum()

    d_image, d_text = run_gradient_chunks(
        image.to(acc), text.to(acc), image.new_empty((0, text.shape[0]), dtype=acc), chunk_rows, acc, acc,
        epilogue, row_weight=None if uniform else row_weight)
    factor = s * row_weight if uniform else s
    return rows_out, d_image.mul_(factor), d_text.mul_(factor), sums[0].clone(), sums[1].clone()


def _torch_backward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor, offset: int,
                    chunk_rows: int) -> _Quad:
    return _torch_gradients(image, text, s, b, row_weight, offset, chunk_rows, with_loss=False)[1:]


def _torch_fused(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int, chunk_rows: int) -> _Five:
    one = torch.ones((), device=image.device, dtype=_acc_dtype(image.dtype))
    return _torch_gradients(image, text, s, b, one, offset, chunk_rows, with_loss=True)


# ---------------------------------------------------------------------------------------------
# reference backend: the materialised formula (tests, debugging).


def _reference_forward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int,
                       chunk_rows: int) -> Tensor:
    acc = _acc_dtype(image.dtype)
    z = s.to(acc) * image.to(acc) @ text.to(acc).t() + b.to(acc)
    y = -torch.ones_like(z)
    pr, pc = _positive_index(z.shape[0], z.shape[1], offset, z.device)
    y[pr, pc] = 1.0
    return -F.logsigmoid(y * z).sum(dim=1)


def _reference_backward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor,
                        offset: int, chunk_rows: int) -> _Quad:
    acc = _acc_dtype(image.dtype)
    with torch.enable_grad():
        img = image.to(acc).detach().requires_grad_()
        txt = text.to(acc).detach().requires_grad_()
        s_ = s.to(acc).detach().requires_grad_()
        b_ = b.to(acc).detach().requires_grad_()
        rows = _reference_forward(img, txt, s_, b_, offset, chunk_rows)
        total = (rows * row_weight.to(acc)).sum()
        return torch.autograd.grad(total, (img, txt, s_, b_))


def _reference_fused(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int,
                     chunk_rows: int) -> _Five:
    one = torch.ones((), device=image.device, dtype=_acc_dtype(image.dtype))
    return (_reference_forward(image, text, s, b, offset, chunk_rows),
            *_reference_backward(image, text, s, b, one, offset, chunk_rows))


# ---------------------------------------------------------------------------------------------
# cpu backend: llm2clip_fast._C (torch.ops.llm2clip_fast.siglip_loss_*), the same chunks in C++.


def _cpu_operands(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    # bf16 GEMMs pay only with native bf16 units (AVX512-BF16/AMX); elsewhere they are emulated
    # several times slower than fp32, so the chunks are multiplied in fp32 there. fp16 GEMMs on CPU
    # are slow everywhere.
    if (image.dtype == torch.bfloat16 and not cpu_has_fast_bf16()) or image.dtype == torch.float16:
        return image.float(), text.float()
    return image, text


def _cpu_forward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int, chunk_rows: int) -> Tensor:
    image, text = _cpu_operands(image, text)
    return torch.ops.llm2clip_fast.siglip_loss_forward(image, text, s, b, offset, chunk_rows)


def _cpu_backward(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor,
                  offset: int, chunk_rows: int) -> _Quad:
    image, text = _cpu_operands(image, text)
    return torch.ops.llm2clip_fast.siglip_loss_backward(image, text, s, b, row_weight, offset, chunk_rows)


def _cpu_fused(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int, chunk_rows: int) -> _Five:
    image, text = _cpu_operands(image, text)
    return torch.ops.llm2clip_fast.siglip_loss_fused(image, text, s, b, offset, chunk_rows)


def _rows_fake(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int, chunk_rows: int) -> Tensor:
    return image.new_empty(image.shape[0], dtype=_acc_dtype(image.dtype))


def _grads_fake(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor,
                offset: int, chunk_rows: int) -> _Quad:
    acc = _acc_dtype(image.dtype)
    return (image.new_empty(image.shape, dtype=acc), text.new_empty(text.shape, dtype=acc),
            image.new_empty((), dtype=acc), image.new_empty((), dtype=acc))


def _fused_fake(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int, chunk_rows: int) -> _Five:
    one = image.new_empty((), dtype=_acc_dtype(image.dtype))
    return (_rows_fake(image, text, s, b, offset, chunk_rows),
            *_grads_fake(image, text, s, b, one, offset, chunk_rows))


def _register_cpu_fakes() -> None:
    """Shape-only versions of the C++ ops, so torch.compile / opcheck can trace them."""
    if cpu_extension() is None or not hasattr(torch.ops.llm2clip_fast, "siglip_loss_fused"):
        return
    torch.library.register_fake("llm2clip_fast::siglip_loss_forward")(_rows_fake)
    torch.library.register_fake("llm2clip_fast::siglip_loss_backward")(_grads_fake)
    torch.library.register_fake("llm2clip_fast::siglip_loss_fused")(_fused_fake)


_register_cpu_fakes()


def _cpu_op_reasons(ctx: DispatchContext) -> list[str]:
    why = cpu_extension_reasons(ctx) + dtype_reasons(
        ctx, (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    )
    if not why and not hasattr(torch.ops.llm2clip_fast, "siglip_loss_fused"):
        why.append("llm2clip_fast._C was built without the siglip_loss ops; rebuild with "
                   "`python setup.py build_ext --inplace`")
    return why


# ---------------------------------------------------------------------------------------------
# triton backend: cuBLAS (torch.mm, fp32 result) for every product, llm2clip_kernels/siglip_loss.py for
# the epilogue.


def _triton_forward_impl(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int,
                         chunk_rows: int) -> Tensor:
    from ..kernels.siglip_loss import siglip_tile, tile_counts

    m, n = image.shape[0], text.shape[0]
    s32, b32 = s.to(torch.float32).reshape(()), b.to(torch.float32).reshape(())
    rows = min(chunk_rows, m)
    loss_part = image.new_empty((tile_counts(rows, n)[1], rows), dtype=torch.float32)
    out = image.new_empty(m, dtype=torch.float32)

    def epilogue(chunk: Tensor, r0: int, r1: int) -> None:
        siglip_tile(chunk, s32, b32, r0 + offset, loss_part=loss_part)
        out[r0:r1] = loss_part[: tile_counts(r1 - r0, n)[1], : r1 - r0].sum(0)

    run_logit_chunks(image, text, rows, False, torch.float32, epilogue)
    return out


def _triton_gradients(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor, offset: int,
                      chunk_rows: int, with_loss: bool) -> _Five:
    from ..kernels.siglip_loss import siglip_tile, tile_counts

    m, n = image.shape[0], text.shape[0]
    s32, b32 = s.to(torch.float32).reshape(()), b.to(torch.float32).reshape(())
    weight = row_weight.to(torch.float32)
    uniform = weight.dim() == 0
    rows = min(chunk_rows, m)
    n_rb, n_cb = tile_counts(rows, n)
    loss_part = image.new_empty((n_cb, rows), dtype=torch.float32) if with_loss else None
    parts = image.new_empty((n_rb * n_cb, 2), dtype=torch.float32)
    rows_out = image.new_empty(m if with_loss else 0, dtype=torch.float32)
    sums = image.new_zeros(2, dtype=torch.float32)
    # The kernel weighs the d_scale/d_bias partials only: g stays unweighted, in (-1, 1).
    kernel_weight = weight.reshape(1) if uniform else weight.contiguous()

    def epilogue(chunk: Tensor, g: Tensor, r0: int, r1: int) -> None:
        c_rb, c_cb = tile_counts(r1 - r0, n)
        w = kernel_weight if uniform else kernel_weight[r0:r1]
        siglip_tile(chunk, s32, b32, r0 + offset, loss_part=loss_part, g_out=g, weight=w, parts=parts)
        if with_loss:
            rows_out[r0:r1] = loss_part[:c_cb, : r1 - r0].sum(0)
        sums.add_(parts[: c_rb * c_cb].sum(0))

    d_image, d_text = run_gradient_chunks(
        image, text, image.new_empty((0, n), dtype=torch.float32), rows, torch.float32, image.dtype, epilogue,
        row_weight=None if uniform else weight)
    factor = s32 * weight if uniform else s32
    return rows_out, d_image.mul_(factor), d_text.mul_(factor), sums[0].clone(), sums[1].clone()


def _triton_backward_impl(image: Tensor, text: Tensor, s: Tensor, b: Tensor, row_weight: Tensor,
                          offset: int, chunk_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _triton_gradients(image, text, s, b, row_weight, offset, chunk_rows, with_loss=False)[1:]


def _triton_fused_impl(image: Tensor, text: Tensor, s: Tensor, b: Tensor, offset: int,
                       chunk_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    one = torch.ones((), device=image.device, dtype=torch.float32)
    return _triton_gradients(image, text, s, b, one, offset, chunk_rows, with_loss=True)


# torch.library ops (llm2clip_fast::siglip_*_triton): torch.compile traces a loss that calls them
# without a graph break, and Inductor sees their kernels (see ops/_library.py).
_triton_forward = define_op("siglip_forward_triton", _triton_forward_impl, _rows_fake, triton=True)
_triton_backward = define_op("siglip_backward_triton", _triton_backward_impl, _grads_fake, triton=True)
_triton_fused = define_op("siglip_fused_triton", _triton_fused_impl, _fused_fake, triton=True)


class SigLipImpl(NamedTuple):
    """A backend's primitives (see :func:`siglip_forward_rows`, :func:`siglip_backward`,
    :func:`siglip_forward_backward`), each taking the rows per chunk last."""

    forward: Any
    backward: Any
    fused: Any
    # Bytes per element of the chunk workspaces alive at once: the logit chunk plus the G chunk.
    workspace_elem_bytes: Callable[[torch.dtype], int]


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    return (torch.zeros(4, 8, device=device, dtype=dtype), torch.zeros(4, 8, device=device, dtype=dtype))


register_op(
    OP_NAME,
    [
        Backend("triton", SigLipImpl(_triton_forward, _triton_backward, _triton_fused,
                                     lambda dt: 4 + torch.empty((), dtype=dt).element_size()),
                functools.partial(triton_half_or_float_reasons, module="siglip_loss"),
                "cuBLAS logit chunks (fp32 result) + a Triton epilogue, overlapped on a second stream"),
        Backend("cpu", SigLipImpl(_cpu_forward, _cpu_backward, _cpu_fused, _acc_bytes), _cpu_op_reasons,
                "C++: at::mm row chunks with a fused OpenMP epilogue"),
        Backend("torch", SigLipImpl(_torch_forward, _torch_backward, _torch_fused,
                                    lambda dt: 4 * _acc_bytes(dt)),
                floating_dtype_reasons, "the same row chunks in pure torch"),
        Backend("reference", SigLipImpl(_reference_forward, _reference_backward, _reference_fused,
                                        lambda dt: 4 * _acc_bytes(dt)),
                reference_reasons, "materialised formula (ops/reference.py); forced only"),
    ],
    description="sigmoid (SigLIP) loss without the B x B matrix",
    probe=_probe,
)


# ---------------------------------------------------------------------------------------------
# the memory plan and input checks


def plan_siglip_chunks(m: int, n: int, device: torch.device, dtype: torch.dtype, backend: str,
                       memory_budget_bytes: int | str | None = None) -> ChunkPlan:
    """Rows per chunk for an (m, n) SigLIP logit matrix served by ``backend``, within the budget."""
    impl: SigLipImpl = registered_ops()[OP_NAME].get(backend).run
    from_env = chunk_elements_from_env(_CHUNK_ENV)
    preferred = from_env if from_env is not None else (
        _CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CPU_CHUNK_ELEMENTS)
    overlapping = device.type == "cuda" and backend == "triton" and overlap_enabled()
    return plan_chunks(m, n, workspace_elements=preferred,
                       workspace_elem_bytes=impl.workspace_elem_bytes(dtype),
                       kept_elem_bytes=_acc_bytes(dtype), buffers=2 if overlapping else 1,
                       budget=memory_budget(device, memory_budget_bytes),
                       min_rows=_MIN_CHUNK_ROWS_CUDA if device.type == "cuda" else 1)


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


def _rows_for(image: Tensor, text: Tensor, chosen: Backend, budget: int | str | None) -> int:
    m, n = image.shape[0], text.shape[0]
    return plan_siglip_chunks(m, n, image.device, image.dtype, chosen.name, budget).rows


# ---------------------------------------------------------------------------------------------
# public primitives


def siglip_forward_rows(
    image: Tensor, text: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float, *,
    offset: int = 0, backend: str | None = None, memory_budget: int | str | None = None,
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
    chosen = _select(image, text, backend)
    return chosen.run.forward(image.detach().contiguous(), text.detach().contiguous(), s, b,
                              _check_offset(offset), _rows_for(image, text, chosen, memory_budget))


def siglip_backward(
    image: Tensor, text: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float,
    row_weight: Tensor, *, offset: int = 0, backend: str | None = None,
    memory_budget: int | str | None = None,
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
    chosen = _select(image, text, backend)
    weight = row_weight.detach().to(_acc_dtype(image.dtype)).contiguous()
    return chosen.run.backward(image.detach().contiguous(), text.detach().contiguous(), s, b, weight,
                               _check_offset(offset), _rows_for(image, text, chosen, memory_budget))


def siglip_forward_backward(
    image: Tensor, text: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float, *,
    offset: int = 0, backend: str | None = None, memory_budget: int | str | None = None,
) -> _Five:
    """:func:`siglip_forward_rows` and :func:`siglip_backward` with unit row weights, in one pass.

    Returns rows (M,), d_image (M, D), d_text (N, D), d_scale, d_bias: the loss rows and the
    gradients of their sum, float32 (float64 for float64 inputs), one GEMM pass over the chunks
    for the loss and the logit gradient. No autograd.
    """
    _check_primitive_inputs(image, text)
    s = check_scale(logit_scale, image.device).detach()
    b = check_bias(logit_bias, image.device).detach()
    chosen = _select(image, text, backend)
    return chosen.run.fused(image.detach().contiguous(), text.detach().contiguous(), s, b,
                            _check_offset(offset), _rows_for(image, text, chosen, memory_budget))


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


class _SigLipTwoPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, reduction: str,
                impl: SigLipImpl, chunk_rows: int) -> Tensor:
        acc = _acc_dtype(image.dtype)
        s = scale.detach().to(acc)
        b = bias.detach().to(acc)
        rows = impl.forward(image, text, s, b, 0, chunk_rows)
        ctx.save_for_backward(image, text, s, b)
        ctx.reduction = reduction
        ctx.impl = impl
        ctx.chunk_rows = chunk_rows
        ctx.param_dtypes = (scale.dtype, bias.dtype)
        return _reduce(rows, reduction)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        image, text, s, b = ctx.saved_tensors
        weight = row_weights_for(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
        d_image, d_text, d_scale, d_bias = ctx.impl.backward(image, text, s, b, weight, 0, ctx.chunk_rows)
        need = ctx.needs_input_grad
        return (
            d_image.to(image.dtype) if need[0] else None,
            d_text.to(text.dtype) if need[1] else None,
            d_scale.to(ctx.param_dtypes[0]) if need[2] else None,
            d_bias.to(ctx.param_dtypes[1]) if need[3] else None,
            None,
            None,
            None,
        )


class _SigLipOnePass(torch.autograd.Function):
    """'mean' / 'sum' with gradients: the forward computes them, the backward rescales (O(B * D) saved)."""

    @staticmethod
    def forward(ctx: Any, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, reduction: str,
                impl: SigLipImpl, chunk_rows: int) -> Tensor:
        acc = _acc_dtype(image.dtype)
        s = scale.detach().to(acc)
        b = bias.detach().to(acc)
        rows, d_image, d_text, d_scale, d_bias = impl.fused(image, text, s, b, 0, chunk_rows)
        ctx.save_for_backward(d_image, d_text, d_scale, d_bias)
        ctx.reduction = reduction
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype, bias.dtype)
        return _reduce(rows, reduction)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        weight = row_weights_for(grad_out.to(saved[0].dtype), ctx.reduction, saved[0].shape[0])
        grads = [(g * weight).to(dt) if need else None
                 for g, dt, need in zip(saved, ctx.dtypes, ctx.needs_input_grad)]
        return (*grads, None, None, None)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    reduction: str = "mean",
    backend: str | None = None,
    memory_budget: int | str | None = None,
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
            row sums. With gradients, 'mean' and 'sum' compute them in the forward's pass over the
            logits (one-pass); 'none' recomputes in the backward (two-pass).
        backend: force a backend ('triton', 'cpu', 'torch', 'reference'); default automatic.
        memory_budget: bytes (int, or a string such as '8GiB') that caps the chunk workspaces;
            default ``LLM2CLIP_LOSS_MEMORY_BUDGET``, else a quarter of the free memory (ops/_chunking.py).
        distributed: compute the global-batch loss across the ranks of ``process_group`` (the
            default group when None); each rank passes its local features. See
            :func:`siglip_loss_global` for the exact convention.
            Passing a ``process_group`` implies ``distributed=True``.

    Returns:
        The loss in float32 (float64 for float64 inputs). Gradients flow to both feature tensors
        and to tensor ``logit_scale`` / ``logit_bias``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if distributed or process_group is not None:
        return siglip_loss_global(image_features, text_features, logit_scale, logit_bias,
                                  reduction=reduction, process_group=process_group, backend=backend,
                                  memory_budget=memory_budget)
    check_pair(image_features, text_features, "image_features", "text_features", same_batch=True)
    if image_features.dtype != text_features.dtype:
        common = torch.promote_types(image_features.dtype, text_features.dtype)
        image_features, text_features = image_features.to(common), text_features.to(common)
    scale = check_scale(logit_scale, image_features.device)
    bias = check_bias(logit_bias, image_features.device)
    chosen = _select(image_features, text_features, backend)
    rows = _rows_for(image_features, text_features, chosen, memory_budget)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_features, text_features, scale, bias))
    one_pass = needs_grad and reduction != "none"
    record_path(OP_NAME, ONE_PASS if one_pass else TWO_PASS)
    function = _SigLipOnePass if one_pass else _SigLipTwoPass
    return function.apply(image_features.contiguous(), text_features.contiguous(), scale, bias, reduction,
                          chosen.run, rows)


# ---------------------------------------------------------------------------------------------
# SigLIP over the global batch of all ranks (the ring: ops/global_batch_ring.py)


class _SigLipLossGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, reduction, backend, group, sizes, budget):  # type: ignore[override]
        ring = Ring(group, sizes)
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        s = scale.detach().to(acc)
        b = bias.detach().to(acc)
        chosen = _select(image, text, backend)
        rows_per_chunk = plan_siglip_chunks(image.shape[0], sum(sizes), image.device, image.dtype,
                                            chosen.name, budget).rows
        one_pass = reduction != "none" and any(ctx.needs_input_grad[:4])
        record_path("siglip_loss", ONE_PASS if one_pass else TWO_PASS)
        own_offset = ring.offsets[ring.rank]
        rows = image.new_zeros(image.shape[0], dtype=acc)
        # One-pass: this rank's gradients of its plain row sum; the text part per piece, reduced to
        # the owners in the backward, once each rank's upstream gradient is known.
        d_image = image.new_zeros(image.shape, dtype=acc) if one_pass else None
        d_text_all = image.new_empty((sum(sizes), image.shape[1]), dtype=acc) if one_pass else None
        d_params = image.new_zeros(2, dtype=acc)

        def compute(p: int, piece: torch.Tensor) -> None:
            offset = own_offset - ring.offsets[p]  # this rank's positives are in its own piece only
            if not one_pass:
                rows.add_(chosen.run.forward(image, piece, s, b, offset, rows_per_chunk))
                return
            r, d_img, d_txt, d_s, d_b = chosen.run.fused(image, piece, s, b, offset, rows_per_chunk)
            rows.add_(r)
            d_image.add_(d_img)
            d_text_all[ring.rows(p)] = d_txt
            d_params[0] += d_s
            d_params[1] += d_b

        text_all = ring_over_text_pieces(ring, text, compute)
        if one_pass:
            ctx.save_for_backward(d_image, d_text_all, d_params)
        else:
            ctx.save_for_backward(image, text_all, s, b)
        ctx.one_pass, ctx.reduction, ctx.impl = one_pass, reduction, chosen.run
        ctx.ring, ctx.rows = ring, rows_per_chunk
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype, bias.dtype)
        if reduction == "mean":
            return rows.sum() / image.shape[0]
        return rows.sum() if reduction == "sum" else rows

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        ring: Ring = ctx.ring
        if ctx.one_pass:
            d_image, d_text_all, d_params = ctx.saved_tensors
            weight = row_weights_for(grad_out.to(d_image.dtype), ctx.reduction, d_image.shape[0])
            d_image, d_params = d_image * weight, d_params * weight
            d_text = reduce_scatter_rows(d_text_all * weight, ring.sizes, ring.group)
        else:
            image, text_all, s, b = ctx.saved_tensors
            weight = row_weights_for(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
            d_image = torch.zeros(image.shape, device=image.device, dtype=s.dtype)
            d_params = torch.zeros(2, device=image.device, dtype=s.dtype)
            own_offset = ring.offsets[ring.rank]

            def contribution(p: int) -> torch.Tensor:
                offset = own_offset - ring.offsets[p]
                d_img, d_txt, d_s, d_b = ctx.impl.backward(image, text_all[ring.rows(p)], s, b, weight,
                                                           offset, ctx.rows)
                d_image.add_(d_img)
                d_params[0] += d_s
                d_params[1] += d_b
                return d_txt

            d_text = ring_reduce_scatter(ring, contribution)
        need = ctx.needs_input_grad
        dt_image, dt_text, dt_scale, dt_bias = ctx.dtypes
        return (
            d_image.to(dt_image) if need[0] else None,
            d_text.to(dt_text) if need[1] else None,
            d_params[0].to(dt_scale) if need[2] else None,
            d_params[1].to(dt_bias) if need[3] else None,
            None, None, None, None, None,
        )


# Collectives and host-side batch sizes: eager only (ops/global_batch_ring.py's docstring).
@torch.compiler.disable
def siglip_loss_global(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    reduction: str = "mean",
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
    memory_budget: int | str | None = None,
) -> torch.Tensor:
    """SigLIP loss of each rank's images against the texts of all ranks (OpenCLIP ``SigLipLoss``).

    Convention (equal to OpenCLIP's ``SigLipLoss(rank, world_size)`` with or without
    ``bidir``, on the same shards). Global batch = concatenation of the ranks' batches in rank
    order; rank r's images are positives with their own texts only. Rank r's loss is
    ``L_r = sum_{i in r, all j} softplus(-y_ij * (s * <image_i, text_j> + b)) / B_r``
    ('sum': without the division, 'none': the (B_r,) per-image row sums). Backward is collective
    (every rank must call it) and gives
    - image features of rank r: ``g_r * dL_r / d(image_r)``;
    - text features of rank r: ``d(sum_q g_q * L_q) / d(text_r)`` (every rank's images saw them),
      returned to the owner by a reduce-scatter;
    - logit_scale, logit_bias: ``g_r * dL_r / d(.)``, rank r's own gradient, exactly as OpenCLIP.
    (g_q is rank q's upstream gradient.) These are OpenCLIP's gradients, which its ring exchange
    routes back to the owners the same way.

    Per rank: the texts travel a ring that overlaps the compute (ops/global_batch_ring.py). With gradients
    and 'mean' or 'sum', each piece's loss and gradients come from one pass (the one-pass path of
    :func:`llm2clip_fast.ops.siglip_loss.siglip_loss`) and the backward scales them and reduces the
    text gradients to their owners; 'none' or no gradients: a loss pass, then a recomputing backward
    whose text gradients travel the ring. The block itself is never held. Unequal local batch sizes
    are supported. Any torch.distributed backend with point-to-point operations (NCCL, gloo). Not
    initialised: raises RuntimeError.
    """

    image_features, text_features = checked_features(image_features, text_features, reduction, process_group)
    scale = check_scale(logit_scale, image_features.device)
    bias = check_bias(logit_bias, image_features.device)
    sizes = local_batch_sizes(image_features, process_group)
    return _SigLipLossGlobal.apply(image_features.contiguous(), text_features.contiguous(), scale, bias,
                                   reduction, backend, process_group, sizes, memory_budget)
