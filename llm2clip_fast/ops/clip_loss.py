"""Fused CLIP contrastive loss (OpenCLIP ``ClipLoss``) that never holds more of the B x B logits
than its memory budget allows.

The O(B^2 * D) work is three GEMMs per row chunk of C rows (a C x N workspace), with the
memory-bound work fused around them:

- forward: ``S_c = image_c @ text.T`` (fp32 result), then an epilogue giving the chunk's row
  log-sum-exp and column partials, merged across chunks into the column log-sum-exp;
- backward: ``S_c`` again (or the kept chunk), an epilogue writing
  ``G = row_coef * softmax_rows + col_coef * softmax_cols`` (each through the saved LSEs) and
  ``sum G * S`` (d logit_scale), then ``d_image_c = s * G @ text`` and ``d_text += s * G.T @ image_c``.

Two memory paths (ops/_chunking.py): with ``keep-logits`` the forward keeps the fp32 chunks and the
backward skips the recompute (6 * B^2 * D FLOPs, as a plain one-GEMM loss); with ``recompute`` it
keeps O(B) statistics (8 * B^2 * D FLOPs, O(B * D) memory plus the chunk workspaces). The memory
budget (``memory_budget=``, ``LLM2CLIP_LOSS_MEMORY_BUDGET``, default a quarter of the free memory)
decides; ``last_path("clip_loss")`` in ops/_chunking.py says which ran.

Two backend-dispatched primitives do it; the loss adds the positive-pair (diagonal) terms,
``loss_i = (row_lse_i + col_lse_i) / 2 - s * <image_i, text_i>``:

- :func:`clip_lse_forward`: row and column log-sum-exp of ``s * image @ text.T`` (and the kept logits).
- :func:`clip_lse_backward`: ``d_image = s * G @ text``, ``d_text = s * G.T @ image`` and
  ``d_scale = sum G * l``.

Backends (op name ``clip_loss``; force with ``backend=...`` or ``LLM2CLIP_BACKEND_CLIP_LOSS``):
``triton`` (CUDA: cuBLAS GEMMs and Triton epilogues, the epilogue of chunk k on a second stream beside
the GEMM of chunk k+1; CPU only when forced under TRITON_INTERPRET=1), ``cpu`` (C++ extension,
float32/bfloat16/float64: at::mm chunks and an OpenMP epilogue built for AVX-512, AVX2 or the baseline,
or the one ``LLM2CLIP_CPU_ISA`` names), ``torch`` (the same chunks in pure torch, any device and float
dtype) and ``reference`` (materialises the matrix; only when forced).
``LLM2CLIP_CLIP_LOSS_CHUNK_ELEMENTS`` sets the preferred chunk workspace (elements of the C x N
buffer); the budget caps it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .._extensions import cpu_extension
from ..distributed import all_gather_rows, logsumexp_across_ranks
from ._availability import (
    cpu_extension_reasons,
    dtype_reasons,
    floating_dtype_reasons,
    reference_reasons,
    triton_half_or_float_reasons,
)
from ._backend import Backend, DispatchContext, record_selection, register_op, select_backend
from ._chunk_schedule import run_gradient_chunks, run_logit_chunks
from ._chunking import ChunkPlan, chunk_elements_from_env, memory_budget, plan_chunks, record_path
from ._library import define_op
from ._overlap import overlap_enabled
from .global_batch_ring import (
    Ring,
    checked_features,
    local_batch_sizes,
    local_row_weights,
    ring_over_text_pieces,
    ring_reduce_scatter,
)
from .loss_inputs import check_pair, check_scale
from .reference import clip_loss_reference

OP_NAME = "clip_loss"
_REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ENV = "LLM2CLIP_CLIP_LOSS_CHUNK_ELEMENTS"
# Preferred chunk workspace (elements of C x N). CPU: 8M (32 MB fp32), small next to the inputs while
# the at::mm calls stay large. CUDA: 2^29 (2 GiB of fp32 logits): C = 8192 rows at B = 65536, and
# still 512 rows at B = 2^20, where each chunk's N x D update of d_text must not make the backward
# memory-bound; the budget caps it.
_CPU_CHUNK_ELEMENTS = 1 << 23
_CUDA_CHUNK_ELEMENTS = 1 << 29
_MIN_CHUNK_ROWS_CUDA = 128

_Pair = tuple[Tensor, Tensor]
_Triple = tuple[Tensor, Tensor, Tensor]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# torch backend: the chunk schedule with torch epilogues, any device and float dtype, fp32 (fp64
# for fp64) arithmetic and operands.


def _torch_lse_forward(image: Tensor, text: Tensor, scale: Tensor, chunk_rows: int,
                       keep_logits: bool) -> _Triple:
    acc = _acc_dtype(image.dtype)
    m, n = image.shape[0], text.shape[0]
    s = scale.to(acc)
    row_lse = image.new_empty(m, dtype=acc)
    col_lse = image.new_full((n,), float("-inf"), dtype=acc)

    def epilogue(chunk: Tensor, r0: int, r1: int) -> None:
        x = chunk * s
        row_lse[r0:r1] = torch.logsumexp(x, dim=1)
        torch.logaddexp(col_lse, torch.logsumexp(x, dim=0), out=col_lse)

    kept = run_logit_chunks(image.to(acc), text.to(acc), chunk_rows, keep_logits, acc, epilogue)
    return row_lse, col_lse, kept


def _torch_lse_backward(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor, logits: Tensor, chunk_rows: int,
) -> _Triple:
    acc = _acc_dtype(image.dtype)
    s = scale.to(acc)
    row_lse, col_lse = row_lse.to(acc), col_lse.to(acc)
    row_coef, col_coef = row_coef.to(acc), col_coef.to(acc)
    d_scale = image.new_zeros((), dtype=acc)

    def epilogue(chunk: Tensor, g: Tensor, r0: int, r1: int) -> None:
        x = chunk * s
        torch.sub(x, col_lse, out=g)
        g.exp_().mul_(col_coef)
        g.add_(x.sub_(row_lse[r0:r1, None]).exp_().mul_(row_coef[r0:r1, None]))
        d_scale.add_(torch.dot(g.reshape(-1), chunk.reshape(-1)))

    d_image, d_text = run_gradient_chunks(image.to(acc), text.to(acc), logits, chunk_rows, acc, acc, epilogue)
    return d_image.mul_(s), d_text.mul_(s), d_scale


# ---------------------------------------------------------------------------------------------
# reference backend: the materialised formula (tests, debugging). It keeps nothing (it has the matrix).


def _reference_lse_forward(image: Tensor, text: Tensor, scale: Tensor, chunk_rows: int,
                           keep_logits: bool) -> _Triple:
    acc = _acc_dtype(image.dtype)
    x = scale.to(acc) * image.to(acc) @ text.to(acc).t()
    nothing_kept = image.new_empty((0, text.shape[0]), dtype=acc)
    return torch.logsumexp(x, dim=1), torch.logsumexp(x, dim=0), nothing_kept


def _reference_lse_backward(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor, logits: Tensor, chunk_rows: int,
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
# cpu backend: llm2clip_fast._C (torch.ops.llm2clip_fast.clip_lse_*), the same chunk schedule in C++.


# bf16 features: the C++ op multiplies float32 copies of them (csrc/cpu/clip_loss.cpp says why),
# so its gradients are as exact as the torch backend's.
def _cpu_lse_forward(image: Tensor, text: Tensor, scale: Tensor, chunk_rows: int,
                     keep_logits: bool) -> _Triple:
    return torch.ops.llm2clip_fast.clip_lse_forward(image, text, scale, chunk_rows, keep_logits)


def _cpu_lse_backward(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor, logits: Tensor, chunk_rows: int,
) -> _Triple:
    return torch.ops.llm2clip_fast.clip_lse_backward(image, text, scale, row_lse, col_lse, row_coef, col_coef,
                                                     logits, chunk_rows)


def _lse_forward_fake(image: Tensor, text: Tensor, scale: Tensor, chunk_rows: int,
                      keep_logits: bool) -> _Triple:
    acc = _acc_dtype(image.dtype)
    m, n = image.shape[0], text.shape[0]
    return (image.new_empty(m, dtype=acc), text.new_empty(n, dtype=acc),
            image.new_empty((m, n) if keep_logits else (0, n), dtype=acc))


def _lse_backward_fake(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor, logits: Tensor, chunk_rows: int,
) -> _Triple:
    acc = _acc_dtype(image.dtype)
    return (image.new_empty(image.shape, dtype=acc), text.new_empty(text.shape, dtype=acc),
            image.new_empty((), dtype=acc))


def _register_cpu_fakes() -> None:
    """Shape-only versions of the C++ ops, so torch.compile / opcheck can trace them."""
    if cpu_extension() is None or not hasattr(torch.ops.llm2clip_fast, "clip_lse_forward"):
        return
    torch.library.register_fake("llm2clip_fast::clip_lse_forward")(_lse_forward_fake)
    torch.library.register_fake("llm2clip_fast::clip_lse_backward")(_lse_backward_fake)


_register_cpu_fakes()


def _cpu_op_reasons(ctx: DispatchContext) -> list[str]:
    why = cpu_extension_reasons(ctx) + dtype_reasons(ctx, (torch.float32, torch.bfloat16, torch.float64))
    if not why and not hasattr(torch.ops.llm2clip_fast, "clip_lse_forward"):
        why.append("llm2clip_fast._C was built without the clip_lse ops; rebuild with "
                   "`python setup.py build_ext --inplace`")
    return why


# ---------------------------------------------------------------------------------------------
# triton backend: cuBLAS (torch.mm, fp32 result) for every product, llm2clip_kernels/clip_loss.py for
# the epilogues.


def _triton_lse_forward_impl(image: Tensor, text: Tensor, scale: Tensor, chunk_rows: int,
                             keep_logits: bool) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.clip_loss import clip_lse_partials, merge_partials, tile_counts

    m, n = image.shape[0], text.shape[0]
    s = scale.to(torch.float32).reshape(())
    rows = min(chunk_rows, m)
    n_rb, n_cb = tile_counts(rows, n)
    row_lse = image.new_empty(m, dtype=torch.float32)
    col_lse = image.new_full((n,), float("-inf"), dtype=torch.float32)
    # Written and read by the epilogues alone (one stream, in order): one set serves every chunk.
    row_part = image.new_empty((2, n_cb, rows), dtype=torch.float32)
    col_part = image.new_empty((2, n_rb, n), dtype=torch.float32)

    def epilogue(chunk: Tensor, r0: int, r1: int) -> None:
        c_rb, c_cb = tile_counts(r1 - r0, n)
        clip_lse_partials(chunk, s, row_part, col_part)
        row_lse[r0:r1] = merge_partials(row_part[:, :c_cb, : r1 - r0])
        torch.logaddexp(col_lse, merge_partials(col_part[:, :c_rb]), out=col_lse)

    kept = run_logit_chunks(image, text, rows, keep_logits, torch.float32, epilogue)
    return row_lse, col_lse, kept


def _triton_lse_backward_impl(
    image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
    row_coef: Tensor, col_coef: Tensor, logits: Tensor, chunk_rows: int,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.clip_loss import clip_grad_tile, tile_counts

    m, n = image.shape[0], text.shape[0]
    s = scale.to(torch.float32).reshape(())
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
    rows = min(chunk_rows, m)
    n_rb, n_cb = tile_counts(rows, n)
    parts = image.new_empty(n_rb * n_cb, dtype=torch.float32)
    d_scale = image.new_zeros((), dtype=torch.float32)

    def epilogue(chunk: Tensor, g: Tensor, r0: int, r1: int) -> None:
        c_rb, c_cb = tile_counts(r1 - r0, n)
        clip_grad_tile(chunk, s, row_lse[r0:r1], col_lse, row_coef[r0:r1], col_coef, g, parts)
        d_scale.add_(parts[: c_rb * c_cb].sum())

    d_image, d_text = run_gradient_chunks(image, text, logits, rows, torch.float32, image.dtype, epilogue)
    factor = s * norm
    return d_image.mul_(factor), d_text.mul_(factor), d_scale * norm


# torch.library ops (llm2clip_fast::clip_lse_*_triton): torch.compile traces a loss that calls them
# without a graph break, and Inductor sees their kernels (see ops/_library.py).
_triton_lse_forward = define_op("clip_lse_forward_triton", _triton_lse_forward_impl, _lse_forward_fake,
                                triton=True)
_triton_lse_backward = define_op("clip_lse_backward_triton", _triton_lse_backward_impl, _lse_backward_fake,
                                 triton=True)


class ClipLseImpl(NamedTuple):
    """A backend's pair of primitives (see :func:`clip_lse_forward` / :func:`clip_lse_backward`).

    ``forward(image, text, scale, chunk_rows, keep_logits) -> (row_lse, col_lse, logits)`` and
    ``backward(image, text, scale, row_lse, col_lse, row_coef, col_coef, logits, chunk_rows)``;
    ``logits`` is the kept (M, N) fp32 matrix, or an empty (0, N) tensor (recompute).
    """

    forward: Any
    backward: Any
    # Bytes per element of the chunk workspaces alive at once: the logit chunk plus the G chunk.
    workspace_elem_bytes: Callable[[torch.dtype], int]


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    return (torch.zeros(4, 8, device=device, dtype=dtype), torch.zeros(4, 8, device=device, dtype=dtype))


def _acc_bytes(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


register_op(
    OP_NAME,
    [
        Backend("triton", ClipLseImpl(_triton_lse_forward, _triton_lse_backward,
                                      lambda dt: 4 + torch.empty((), dtype=dt).element_size()),
                functools.partial(triton_half_or_float_reasons, module="clip_loss"),
                "cuBLAS logit chunks (fp32 result) + Triton epilogues, overlapped on a second stream"),
        Backend("cpu", ClipLseImpl(_cpu_lse_forward, _cpu_lse_backward, lambda dt: 2 * _acc_bytes(dt)),
                _cpu_op_reasons, "C++: at::mm row chunks with a fused OpenMP epilogue"),
        Backend("torch", ClipLseImpl(_torch_lse_forward, _torch_lse_backward, lambda dt: 3 * _acc_bytes(dt)),
                floating_dtype_reasons, "the same row chunks in pure torch"),
        Backend("reference", ClipLseImpl(_reference_lse_forward, _reference_lse_backward,
                                         lambda dt: 3 * _acc_bytes(dt)),
                reference_reasons, "materialised formula (ops/reference.py); forced only"),
    ],
    description="symmetric InfoNCE (CLIP) loss without the B x B matrix",
    probe=_probe,
)


# ---------------------------------------------------------------------------------------------
# the memory plan


def _preferred_chunk_elements(device: torch.device) -> int:
    from_env = chunk_elements_from_env(_CHUNK_ENV)
    if from_env is not None:
        return from_env
    return _CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CPU_CHUNK_ELEMENTS


def plan_clip_chunks(m: int, n: int, device: torch.device, dtype: torch.dtype, backend: str, *,
                     needs_grad: bool, memory_budget_bytes: int | str | None = None) -> ChunkPlan:
    """Rows per chunk and keep-or-recompute for an (m, n) CLIP logit matrix served by ``backend``.

    ``needs_grad``: only a call whose backward will run keeps logits. The budget is
    :func:`llm2clip_fast.ops._chunking.memory_budget` of ``memory_budget_bytes``.
    """
    impl: ClipLseImpl = _select_by_name(backend).run
    overlapping = device.type == "cuda" and backend == "triton" and overlap_enabled()
    return plan_chunks(
        m, n, workspace_elements=_preferred_chunk_elements(device),
        workspace_elem_bytes=impl.workspace_elem_bytes(dtype), kept_elem_bytes=_acc_bytes(dtype),
        buffers=2 if overlapping else 1, budget=memory_budget(device, memory_budget_bytes),
        min_rows=_MIN_CHUNK_ROWS_CUDA if device.type == "cuda" else 1,
        want_keep=needs_grad and backend != "reference",
    )


def _select_by_name(name: str) -> Backend:
    from ._backend import registered_ops

    return registered_ops()[OP_NAME].get(name)


# ---------------------------------------------------------------------------------------------
# public primitives


def _select(image: Tensor, text: Tensor, backend: str | None) -> Backend:
    return record_selection(OP_NAME, select_backend(OP_NAME, [image, text], backend=backend))


def _check_primitive_pair(image: Tensor, text: Tensor) -> None:
    check_pair(image, text, "image", "text", same_batch=False)
    if image.dtype != text.dtype:
        raise TypeError(f"image and text must share a dtype, got {image.dtype} and {text.dtype}")


def clip_lse_forward(
    image: Tensor, text: Tensor, logit_scale: Tensor, *, backend: str | None = None,
    keep_logits: bool = False, memory_budget: int | str | None = None,
) -> _Pair | _Triple:
    """Row and column log-sum-exp of ``logit_scale * image @ text.T`` in row chunks.

    image: (M, D), text: (N, D), M != N allowed, same floating dtype and device. logit_scale: 0-dim
    tensor (the multiplier s). Returns ``row_lse`` (M,) and ``col_lse`` (N,) in float32 (float64
    for float64 inputs). ``keep_logits=True`` also returns the (M, N) unscaled logits (fp32/fp64)
    for :func:`clip_lse_backward` when they fit ``memory_budget`` (ops/_chunking.py), else an empty
    (0, N) tensor. Extra memory otherwise: O((M + N) * D) plus the chunk workspaces. No autograd.
    """
    _check_primitive_pair(image, text)
    scale = check_scale(logit_scale, image.device).detach()
    chosen = _select(image, text, backend)
    plan = plan_clip_chunks(image.shape[0], text.shape[0], image.device, image.dtype, chosen.name,
                            needs_grad=keep_logits, memory_budget_bytes=memory_budget)
    row_lse, col_lse, logits = chosen.run.forward(image.detach().contiguous(), text.detach().contiguous(),
                                                  scale, plan.rows, plan.keep_logits)
    return (row_lse, col_lse, logits) if keep_logits else (row_lse, col_lse)


def clip_lse_backward(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    row_coef: Tensor,
    col_coef: Tensor,
    *,
    logits: Tensor | None = None,
    backend: str | None = None,
    memory_budget: int | str | None = None,
) -> _Triple:
    """Gradient contraction of the CLIP LSE terms, from kept logits or recomputing each chunk.

    With ``l = image @ text.T`` and
    ``G_ij = row_coef_i * exp(s*l_ij - row_lse_i) + col_coef_j * exp(s*l_ij - col_lse_j)``
    returns ``d_image = s * G @ text`` (M, D), ``d_text = s * G.T @ image`` (N, D) and
    ``d_scale = sum_ij G_ij * l_ij`` (0-dim), all float32 (float64 for float64 inputs).
    row_lse, row_coef: (M,); col_lse, col_coef: (N,). logits: what :func:`clip_lse_forward` kept
    (None or empty: recompute). No autograd.
    """
    _check_primitive_pair(image, text)
    m, n = image.shape[0], text.shape[0]
    for name, t, size in (("row_lse", row_lse, m), ("col_lse", col_lse, n), ("row_coef", row_coef, m),
                          ("col_coef", col_coef, n)):
        if not isinstance(t, Tensor) or t.shape != (size,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape ({size},), got {shape}")
        if t.device != image.device:
            raise ValueError(f"{name} is on {t.device} but image is on {image.device}")
    acc = _acc_dtype(image.dtype)
    if logits is None or logits.numel() == 0:
        logits = image.new_empty((0, n), dtype=acc)
    elif logits.shape != (m, n) or logits.dtype != acc or logits.device != image.device:
        raise ValueError(f"logits must be the ({m}, {n}) {acc} tensor clip_lse_forward kept on "
                         f"{image.device}, got {tuple(logits.shape)} {logits.dtype} on {logits.device}")
    scale = check_scale(logit_scale, image.device).detach()
    chosen = _select(image, text, backend)
    plan = plan_clip_chunks(m, n, image.device, image.dtype, chosen.name, needs_grad=False,
                            memory_budget_bytes=memory_budget)
    return chosen.run.backward(image.detach().contiguous(), text.detach().contiguous(), scale,
                               row_lse.detach().contiguous(), col_lse.detach().contiguous(),
                               row_coef.detach().contiguous(), col_coef.detach().contiguous(),
                               logits.detach().contiguous(), plan.rows)


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
                impl: ClipLseImpl, chunk_rows: int, keep_logits: bool) -> Tensor:
        acc = _acc_dtype(image.dtype)
        s = scale.detach().to(acc)
        row_lse, col_lse, logits = impl.forward(image, text, s, chunk_rows, keep_logits)
        # Positive pairs: the diagonal <image_i, text_i>, O(B * D).
        diag = torch.einsum("bd,bd->b", image.to(acc), text.to(acc))
        per_sample = 0.5 * (row_lse + col_lse) - s * diag
        ctx.save_for_backward(image, text, s, row_lse, col_lse, diag, logits)
        ctx.reduction = reduction
        ctx.impl = impl
        ctx.chunk_rows = chunk_rows
        ctx.scale_dtype = scale.dtype
        return _reduce(per_sample, reduction)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        image, text, s, row_lse, col_lse, diag, logits = ctx.saved_tensors
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
        d_image, d_text, d_scale = ctx.impl.backward(image, text, s, row_lse, col_lse, coef, coef, logits,
                                                     ctx.chunk_rows)
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
    memory_budget: int | str | None = None,
    distributed: bool = False,
    process_group: Any = None,
) -> Tensor:
    """Symmetric InfoNCE loss of OpenCLIP's ``ClipLoss``, within a memory budget.

    Args:
        image_features: (B, D) float tensor (float32, float16, bfloat16 or float64).
        text_features: (B, D) float tensor on the same device; a different float dtype is promoted.
        logit_scale: the multiplier s (already exponentiated): a positive 0-dim (or one-element)
            tensor, which receives a gradient, or a positive Python float (no gradient).
        reduction: 'mean' (OpenCLIP's value), 'sum', or 'none' for the per-sample (B,) losses
            ``(CE(logits[i], i) + CE(logits.T[i], i)) / 2``.
        backend: force a backend ('triton', 'cpu', 'torch', 'reference'); default automatic.
        memory_budget: bytes (int, or a string such as '8GiB') the loss may hold beyond O(B * D):
            the fp32 logits are kept for the backward (no recompute) when they fit, else each chunk
            is recomputed. Default: ``LLM2CLIP_LOSS_MEMORY_BUDGET``, else a quarter of the free
            device memory (CPU: of the available RAM) at the call. See ops/_chunking.py.
        distributed: compute the global-batch loss across the ranks of ``process_group`` (the
            default group when None); each rank passes its local features. See
            :func:`clip_loss_global` for the exact convention.
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
        return clip_loss_global(image_features, text_features, logit_scale, reduction=reduction,
                                process_group=process_group, backend=backend, memory_budget=memory_budget)
    check_pair(image_features, text_features, "image_features", "text_features", same_batch=True)
    if image_features.dtype != text_features.dtype:
        common = torch.promote_types(image_features.dtype, text_features.dtype)
        image_features, text_features = image_features.to(common), text_features.to(common)
    scale = check_scale(logit_scale, image_features.device)
    chosen = _select(image_features, text_features, backend)
    if chosen.name == "reference":
        record_path(OP_NAME, "materialised")
        out = clip_loss_reference(image_features, text_features, scale, reduction=reduction)
        return out.double() if image_features.dtype == torch.float64 else out
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_features, text_features, scale))
    b = image_features.shape[0]
    plan = plan_clip_chunks(b, b, image_features.device, image_features.dtype, chosen.name,
                            needs_grad=needs_grad, memory_budget_bytes=memory_budget)
    record_path(OP_NAME, plan.path)
    return _ClipLossFunction.apply(image_features.contiguous(), text_features.contiguous(), scale, reduction,
                                   chosen.run, plan.rows, plan.keep_logits)


# ---------------------------------------------------------------------------------------------
# CLIP over the global batch of all ranks (the ring: ops/global_batch_ring.py)


class _ClipLossGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, reduction, backend, group, sizes, budget):  # type: ignore[override]
        ring = Ring(group, sizes)
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        s = scale.detach().to(acc)
        chosen = _select(image, text, backend)
        n_all = sum(sizes)
        plan = plan_clip_chunks(image.shape[0], n_all, image.device, image.dtype, chosen.name,
                                needs_grad=any(ctx.needs_input_grad[:3]), memory_budget_bytes=budget)
        record_path("clip_loss", plan.path)
        row_lses: list[torch.Tensor] = []
        col_lse_part = image.new_empty(n_all, dtype=acc)
        kept: dict[int, torch.Tensor] = {}

        def compute(p: int, piece: torch.Tensor) -> None:
            row_lse, col_lse, logits = chosen.run.forward(image, piece, s, plan.rows, plan.keep_logits)
            row_lses.append(row_lse)
            col_lse_part[ring.rows(p)] = col_lse
            kept[p] = logits

        text_all = ring_over_text_pieces(ring, text, compute)
        row_lse = torch.logsumexp(torch.stack(row_lses), dim=0)
        col_lse = logsumexp_across_ranks(col_lse_part, group)
        diag = torch.einsum("bd,bd->b", image.to(acc), text.to(acc))
        own = ring.rows(ring.rank)
        per_sample = 0.5 * (row_lse + col_lse[own]) - s * diag
        ctx.save_for_backward(image, text, text_all, s, row_lse, col_lse, diag,
                              *(kept[p] for p in range(ring.world)))
        ctx.reduction, ctx.impl, ctx.ring, ctx.rows = reduction, chosen.run, ring, plan.rows
        ctx.scale_dtype = scale.dtype
        if reduction == "mean":
            return per_sample.mean()
        return per_sample.sum() if reduction == "sum" else per_sample

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        image, text, text_all, s, row_lse, col_lse, diag, *kept = ctx.saved_tensors
        ring: Ring = ctx.ring
        g = local_row_weights(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
        coef = 0.5 * g
        # Text j's term (its column LSE) belongs to the rank owning text j, with that rank's upstream
        # gradient: the column coefficients are every rank's row coefficients, gathered (O(B)).
        col_coef = all_gather_rows(coef, ring.sizes, ring.group)
        d_image = torch.zeros(image.shape, device=image.device, dtype=s.dtype)
        d_scale = torch.zeros((), device=image.device, dtype=s.dtype)

        def contribution(p: int) -> torch.Tensor:
            cols = ring.rows(p)
            col_lse_p, col_coef_p = col_lse[cols].contiguous(), col_coef[cols].contiguous()
            d_img, d_txt, d_s = ctx.impl.backward(image, text_all[cols], s, row_lse, col_lse_p, coef,
                                                  col_coef_p, kept[p], ctx.rows)
            d_image.add_(d_img)
            d_scale.add_(d_s)
            return d_txt

        d_text = ring_reduce_scatter(ring, contribution)
        gs = (g * s)[:, None]
        d_image = d_image - gs * text.to(s.dtype)
        d_text = d_text - gs * image.to(s.dtype)
        d_scale = d_scale - (g * diag).sum()
        # The blocks of all ranks together give d(sum_r L_r)/d(scale); each rank returns the rank
        # average, which is what gradient averaging (DDP) makes of OpenCLIP's per-rank values.
        dist.all_reduce(d_scale, group=ring.group)
        d_scale = d_scale / ring.world
        need = ctx.needs_input_grad
        return (
            d_image.to(image.dtype) if need[0] else None,
            d_text.to(text.dtype) if need[1] else None,
            d_scale.to(ctx.scale_dtype) if need[2] else None,
            None, None, None, None, None,
        )


# Collectives and host-side batch sizes: eager only (ops/global_batch_ring.py's docstring).
@torch.compiler.disable
def clip_loss_global(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    reduction: str = "mean",
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
    memory_budget: int | str | None = None,
) -> torch.Tensor:
    """Symmetric CLIP loss over the global batch of all ranks, from each rank's local features.

    Convention (equal to OpenCLIP's ``ClipLoss(local_loss=True, gather_with_grad=True)`` on the
    same shards). Global batch = concatenation of the ranks' batches in rank order; rank r holds
    rows ``offset_r .. offset_r + B_r - 1``. Rank r's loss is
    ``L_r = mean_{i in r} (CE_i(image_i vs all texts) + CE_i(text_i vs all images)) / 2``
    ('sum': the sum, 'none': the (B_r,) per-sample values). Backward is collective (every rank
    must call it) and gives
    - image/text features of rank r: ``d(sum_q g_q * L_q) / d(features_r)`` where g_q is rank q's
      upstream gradient: exactly OpenCLIP's gradients (they flow back through the gather), and
      with equal B_r and g_q = 1, W times the gradient of the single-process loss on the
      concatenated batch; DDP's averaging turns them into that gradient;
    - logit_scale: ``(1/W) * d(sum_q g_q * L_q) / d(scale)`` on every rank: the rank average of
      OpenCLIP's per-rank gradients, i.e. identical after DDP averages the parameter's gradient
      (the per-rank split would need a second pass over the tiles).

    Work and memory per rank: the texts travel a ring of point-to-point transfers that overlap the
    compute (ops/global_batch_ring.py); one pass over the (B_r x B_global) logit chunks gives row LSEs
    locally and column-LSE partials combined across ranks with two O(B_global) all_reduces; the
    backward reads the kept chunks or recomputes them (``memory_budget``, as in
    :func:`llm2clip_fast.ops.clip_loss.clip_loss`) and returns text gradients to their owners
    around the ring. Unequal local batch sizes are supported. Any torch.distributed backend with
    point-to-point operations (NCCL, gloo). Not initialised: raises RuntimeError.
    """

    image_features, text_features = checked_features(image_features, text_features, reduction, process_group)
    scale = check_scale(logit_scale, image_features.device)
    sizes = local_batch_sizes(image_features, process_group)
    return _ClipLossGlobal.apply(image_features.contiguous(), text_features.contiguous(), scale, reduction,
                                 backend, process_group, sizes, memory_budget)
