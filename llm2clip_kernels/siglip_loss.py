"""Triton epilogue of the fused SigLIP loss, over fp32 logit chunks that cuBLAS computed.

Logits ``z_ij = scale * S_ij + bias`` with ``S`` a chunk of ``image @ text.T`` (rows x N, fp32, unit
column stride, computed by ``torch.mm`` with an fp32 result). The positive of chunk row ``i`` is
column ``i + offset`` (the chunk's first global row plus the rank's offset in distributed mode);
every other pair is a negative. Pair loss ``softplus(-y_ij * z_ij)``, y = +1 for the positive.

:func:`siglip_tile` is one write-only pass over the chunk that, per (BLOCK_M x BLOCK_N) tile, writes

- with ``loss_part``: each row's loss summed over the tile's columns (reduced by the caller over the
  column blocks);
- with ``g_out``: the unweighted pair gradient ``g0 = -y * sigmoid(-y z)`` (in (-1, 1), so a 16-bit
  ``g_out`` keeps it; the row weights of order 1/B go in after the gradient GEMMs), and per tile
  ``sum w_i g0_ij S_ij`` and ``sum w_i g0_ij`` (the d_scale and d_bias partials).

Both at once is the one-pass SigLIP: loss and gradients of a mean or sum loss from one GEMM per chunk.
Why not a Triton GEMM: see llm2clip_kernels/clip_loss.py (cuBLAS 781 against 253 TFLOP/s on the H200).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._traceable import traceable

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK_M = 16 if _INTERPRET else 64
BLOCK_N = 32 if _INTERPRET else 128
_WARP_CONFIGS = [triton.Config({}, num_warps=4)] if _INTERPRET else [
    triton.Config({}, num_warps=w) for w in (4, 8)]


def tile_counts(rows: int, n: int) -> tuple[int, int]:
    """(row blocks, column blocks) of a rows x n chunk: the partial buffers' leading sizes."""
    return triton.cdiv(rows, BLOCK_M), triton.cdiv(n, BLOCK_N)


def _bucket(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def _softplus(x, e):
    # softplus(x) = max(x, 0) + log(1 + e), e = exp(-|x|); log(1 + e) loses every e below fp32's
    # epsilon, and the many far negatives of a trained model sit exactly there, so small e uses its series.
    small = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-3, small, tl.log(1.0 + e))


@triton.jit
def _sigmoid(x, e):
    # From e = exp(-|x|) <= 1, never an overflowing exp(|x|): one divide.
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.autotune(configs=_WARP_CONFIGS, key=["N_BUCKET", "LOSS", "GRAD"])
@triton.jit
def _siglip_tile_kernel(
    s_ptr, stride_s, rows, N, offset, scale_ptr, bias_ptr,
    loss_ptr, stride_lp,
    g_ptr, stride_g, weight_ptr, stride_w, part_ptr,
    N_BUCKET, LOSS: tl.constexpr, GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    l = tl.load(s_ptr + offs_m.to(tl.int64)[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0)
    l = l.to(tl.float32)
    z = scale * l + bias
    positive = offs_n[None, :] == offs_m[:, None] + offset
    signed = tl.where(positive, -z, z)  # -y * z
    e = tl.exp(-tl.abs(signed))  # the one exponential the loss and the gradient share
    if LOSS:
        term = tl.where(mask, _softplus(signed, e), 0.0)
        tl.store(loss_ptr + pid_n * stride_lp + offs_m, tl.sum(term, 1), mask=mask_m)
    if GRAD:
        # d softplus(-y z) / dz = -y * sigmoid(-y z), taken directly (not 1 - sigmoid(y z)) so the tiny
        # gradients of well-separated pairs survive.
        sg = _sigmoid(signed, e)
        g0 = tl.where(mask, tl.where(positive, -sg, sg), 0.0)
        tl.store(g_ptr + offs_m.to(tl.int64)[:, None] * stride_g + offs_n[None, :], g0.to(g_ptr.dtype.element_ty),
                 mask=mask)
        w = tl.load(weight_ptr + offs_m * stride_w, mask=mask_m, other=0.0)
        gw = g0 * w[:, None]
        slot = pid_m * tl.num_programs(1) + pid_n
        tl.store(part_ptr + 2 * slot, tl.sum(tl.sum(gw * l, 1), 0))
        tl.store(part_ptr + 2 * slot + 1, tl.sum(tl.sum(gw, 1), 0))


def siglip_tile(s_chunk: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int, *,
                loss_part: torch.Tensor | None = None, g_out: torch.Tensor | None = None,
                weight: torch.Tensor | None = None, parts: torch.Tensor | None = None) -> None:
    """One pass over a logit chunk (module docstring); at least one of ``loss_part``/``g_out``.

    s_chunk: (rows, N) fp32, before scale and bias; scale, bias: 0-dim fp32 tensors. offset: the
    column of row 0's positive. loss_part: (column blocks, >= rows) fp32. g_out: (rows, N) any float
    dtype, with ``weight`` (a 1-element tensor for a uniform weight, or (rows,)) fp32 and ``parts``
    (row blocks * column blocks, 2) fp32. Sizes from :func:`tile_counts`.
    """
    if s_chunk.dim() != 2 or s_chunk.stride(1) != 1 or s_chunk.dtype != torch.float32:
        raise ValueError(f"the logit chunk must be a 2-D fp32 tensor with unit column stride, got "
                         f"{s_chunk.dtype} of shape {tuple(s_chunk.shape)}, strides {s_chunk.stride()}")
    loss, grad = loss_part is not None, g_out is not None
    if not (loss or grad):
        raise ValueError("siglip_tile needs loss_part, g_out, or both")
    if grad and (weight is None or parts is None):
        raise ValueError("siglip_tile: g_out needs weight and parts")
    rows, n = s_chunk.shape
    n_rb, n_cb = tile_counts(rows, n)
    dummy = s_chunk  # a pointer for the outputs a pass does not write (never dereferenced)
    traceable(_siglip_tile_kernel)[(n_rb, n_cb)](
        s_chunk, s_chunk.stride(0), rows, n, int(offset), scale, bias,
        loss_part if loss else dummy, loss_part.stride(0) if loss else 0,
        g_out if grad else dummy, g_out.stride(0) if grad else 0,
        weight if grad else dummy, (1 if weight.numel() > 1 else 0) if grad else 0,
        parts if grad else dummy,
        _bucket(n), LOSS=loss, GRAD=grad, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )


def chosen_configs() -> dict[str, str]:
    """The warp count the autotuned epilogue picked for its latest launch (benches log it)."""
    best = getattr(_siglip_tile_kernel, "best_config", None)
    return {"siglip_tile": f"BLOCK_M={BLOCK_M} BLOCK_N={BLOCK_N} num_warps={best.num_warps}" if best
            else "not run"}
