"""Triton epilogues of the fused CLIP loss, over fp32 logit chunks that cuBLAS computed.

The O(B^2 * D) products run on cuBLAS (``torch.mm`` with an fp32 result); these kernels do the
memory-bound work on a chunk ``S`` (rows x N, fp32, unit column stride) that cuBLAS cannot fuse.
Both are write-only (no read-modify-write of a shared buffer, no atomics), so any program order
and any autotune trial gives the same result, and both work in base 2 (exp2/log2 are the native
GPU instructions): ``x = s * S * log2(e)``.

- :func:`clip_lse_partials`: per (BLOCK_M x BLOCK_N) tile, the row (max, sum 2^(x - max)) for the
  tile's column block and the column (max, sum) for its row block. :func:`merge_partials`
  combines them (O(rows * N / BLOCK) work) into the chunk's row log-sum-exp and column log-sum-exp.
- :func:`clip_grad_tile`: ``G = row_coef * exp(s*S - row_lse) + col_coef * exp(s*S - col_lse)``
  stored in G's dtype (bf16/fp16/fp32), and one partial of ``sum G * S`` per tile (d logit_scale).

Why not a Triton GEMM: on the H200 the earlier all-Triton CLIP forward (a persistent GEMM with the
log-sum-exp in its epilogue) reached 253 TFLOP/s where cuBLAS reached 781 (docs/benchmarks.md,
"H200: the first GPU run"); the epilogue is a pass over memory that cuBLAS runs at full speed around.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._traceable import traceable

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Fixed tiles (the partial buffers' layout depends on them); the interpreter's small tiles make the
# tests' odd sizes cross several blocks. Only the warp count is tuned.
BLOCK_M = 16 if _INTERPRET else 64
BLOCK_N = 32 if _INTERPRET else 128
_WARP_CONFIGS = [triton.Config({}, num_warps=4)] if _INTERPRET else [
    triton.Config({}, num_warps=w) for w in (4, 8)]


def tile_counts(rows: int, n: int) -> tuple[int, int]:
    """(row blocks, column blocks) of a rows x n chunk: the partial buffers' leading sizes."""
    return triton.cdiv(rows, BLOCK_M), triton.cdiv(n, BLOCK_N)


def _bucket(n: int) -> int:
    # Autotune key: a power of two, so a new batch size does not re-tune.
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.autotune(configs=_WARP_CONFIGS, key=["N_BUCKET"])
@triton.jit
def _lse_partials_kernel(
    s_ptr, stride_s, rows, N, scale_ptr,
    row_max_ptr, row_sum_ptr, stride_rp,
    col_max_ptr, col_sum_ptr, stride_cp,
    N_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    # 64-bit offsets: a chunk can pass 2^31 elements.
    offs = offs_m.to(tl.int64)[:, None] * stride_s + offs_n[None, :]
    x = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale2
    x = tl.where(mask, x, float("-inf"))
    # Every row (column) kept below has at least one valid entry, so its max is finite; padding
    # rows/columns get a finite stand-in max and are not stored.
    r_max = tl.where(mask_m, tl.max(x, 1), 0.0)
    r_sum = tl.sum(tl.exp2(x - r_max[:, None]), 1)
    tl.store(row_max_ptr + pid_n * stride_rp + offs_m, r_max, mask=mask_m)
    tl.store(row_sum_ptr + pid_n * stride_rp + offs_m, r_sum, mask=mask_m)
    c_max = tl.where(mask_n, tl.max(x, 0), 0.0)
    c_sum = tl.sum(tl.exp2(x - c_max[None, :]), 0)
    tl.store(col_max_ptr + pid_m.to(tl.int64) * stride_cp + offs_n, c_max, mask=mask_n)
    tl.store(col_sum_ptr + pid_m.to(tl.int64) * stride_cp + offs_n, c_sum, mask=mask_n)


@triton.autotune(configs=_WARP_CONFIGS, key=["N_BUCKET"])
@triton.jit
def _grad_tile_kernel(
    s_ptr, stride_s, rows, N, scale_ptr, row_lse_ptr, col_lse_ptr, row_coef_ptr, col_coef_ptr,
    g_ptr, stride_g, part_ptr,
    N_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    l = tl.load(s_ptr + offs_m.to(tl.int64)[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0)
    l = l.to(tl.float32)
    x = l * scale2
    row_lse2 = tl.load(row_lse_ptr + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    col_lse2 = tl.load(col_lse_ptr + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
    row_coef = tl.load(row_coef_ptr + offs_m, mask=mask_m, other=0.0)
    col_coef = tl.load(col_coef_ptr + offs_n, mask=mask_n, other=0.0)
    g = row_coef[:, None] * tl.exp2(x - row_lse2[:, None]) + col_coef[None, :] * tl.exp2(x - col_lse2[None, :])
    g = tl.where(mask, g, 0.0)
    tl.store(g_ptr + offs_m.to(tl.int64)[:, None] * stride_g + offs_n[None, :], g.to(g_ptr.dtype.element_ty),
             mask=mask)
    tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(g * l, 1), 0))


def _check_chunk(s_chunk: torch.Tensor) -> None:
    if s_chunk.dim() != 2 or s_chunk.stride(1) != 1 or s_chunk.dtype != torch.float32:
        raise ValueError(f"the logit chunk must be a 2-D fp32 tensor with unit column stride, got "
                         f"{s_chunk.dtype} of shape {tuple(s_chunk.shape)}, strides {s_chunk.stride()}")


def clip_lse_partials(s_chunk: torch.Tensor, scale: torch.Tensor, row_part: torch.Tensor,
                      col_part: torch.Tensor) -> None:
    """Write the chunk's row and column partials (base 2) for :func:`merge_partials`.

    s_chunk: (rows, N) fp32 logits (before the scale). scale: 0-dim fp32 tensor (no host sync).
    row_part: (2, column blocks, >= rows) fp32 (max, sum); col_part: (2, row blocks, N) fp32.
    Sizes from :func:`tile_counts`; every entry inside them is overwritten.
    """
    _check_chunk(s_chunk)
    rows, n = s_chunk.shape
    n_rb, n_cb = tile_counts(rows, n)
    traceable(_lse_partials_kernel)[(n_rb, n_cb)](
        s_chunk, s_chunk.stride(0), rows, n, scale,
        row_part[0], row_part[1], row_part.stride(1),
        col_part[0], col_part[1], col_part.stride(1),
        _bucket(n), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )


def merge_partials(part: torch.Tensor) -> torch.Tensor:
    """Natural-log log-sum-exp over dim 0 of base-2 partials ``part`` = (max (P, L), sum (P, L))."""
    peak = part[0].amax(0)
    total = (part[1] * torch.exp2(part[0] - peak)).sum(0)
    return (peak + torch.log2(total)) * _LN2


def clip_grad_tile(s_chunk: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
                   row_coef: torch.Tensor, col_coef: torch.Tensor, g_out: torch.Tensor,
                   parts: torch.Tensor) -> None:
    """Write G for a chunk into ``g_out`` and each tile's ``sum G * S`` into ``parts``.

    s_chunk: (rows, N) fp32 logits; row_lse, row_coef: (rows,) fp32; col_lse, col_coef: (N,) fp32;
    g_out: (rows, N), unit column stride, any float dtype; parts: (row blocks * column blocks,) fp32.
    """
    _check_chunk(s_chunk)
    rows, n = s_chunk.shape
    n_rb, n_cb = tile_counts(rows, n)
    traceable(_grad_tile_kernel)[(n_rb, n_cb)](
        s_chunk, s_chunk.stride(0), rows, n, scale, row_lse, col_lse, row_coef, col_coef,
        g_out, g_out.stride(0), parts,
        _bucket(n), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )


def chosen_configs() -> dict[str, str]:
    """The warp count each autotuned epilogue picked for its latest launch (benches log it)."""
    out = {}
    for name, kernel in (("clip_lse_partials", _lse_partials_kernel), ("clip_grad_tile", _grad_tile_kernel)):
        best = getattr(kernel, "best_config", None)
        out[name] = f"BLOCK_M={BLOCK_M} BLOCK_N={BLOCK_N} num_warps={best.num_warps}" if best else "not run"
    return out
