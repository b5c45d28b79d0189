"""Triton kernels around the 8-bit GEMMs of the frozen LLM (llm2clip_fast/models/w8a8.py).

- ``_quantize_rows_kernel``: per row (token) of x (M, K): optional SmoothQuant scaling ``x * inv_smooth``,
  ``amax = max |x|``, scale ``amax / QMAX`` and the 8-bit codes: int8 (round half to even, as torch.round)
  or fp8 e4m3 (the cast rounds). One read of x, one write of the codes: where the same math as torch
  ops takes four passes (scale, abs, amax, divide/round/cast).
- ``_dequantize_int32_kernel``: ``out = acc * row_scale * col_scale + bias`` from ``torch._int_mm``'s
  int32 (M, N), in the output dtype, in one pass.

Math is fp32. Under ``TRITON_INTERPRET=1`` the int8 kernels run on CPU tensors (the tests); fp8 needs
a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._traceable import traceable

_BLOCK_K = 1024


@triton.jit
def _quantize_rows_kernel(X, INV, Q, SCALE, K, stride_x, stride_q, QMAX: tl.constexpr, SMOOTH: tl.constexpr,
                          FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        if SMOOTH:
            x = x * tl.load(INV + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    m = tl.max(amax, axis=0)
    # A row of zeros (or below float's normal range) keeps scale 1 and codes 0.
    tiny = m < 1.1754943508222875e-38
    scale = tl.where(tiny, 1.0, m / QMAX)
    r = tl.where(tiny, 0.0, QMAX / tl.maximum(m, 1.1754943508222875e-38))
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        if SMOOTH:
            x = x * tl.load(INV + cols, mask=cols < K, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x * r, -QMAX), QMAX)
        if FP8:
            code = y.to(Q.dtype.element_ty)
        else:
            # Round half to even: rint via the 1.5 * 2^23 trick is exact for |y| <= 127.
            code = ((y + 12582912.0) - 12582912.0).to(tl.int8)
        tl.store(Q + row * stride_q + cols, code, mask=cols < K)
    tl.store(SCALE + row, scale)


@triton.jit
def _dequantize_int32_kernel(ACC, ROW_SCALE, COL_SCALE, BIAS, OUT, M, N, stride_acc, stride_out,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    acc = tl.load(ACC + rows[:, None] * stride_acc + cols[None, :], mask=mask, other=0).to(tl.float32)
    rs = tl.load(ROW_SCALE + rows, mask=rows < M, other=0.0)
    cs = tl.load(COL_SCALE + cols, mask=cols < N, other=0.0)
    y = acc * rs[:, None] * cs[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, inv_smooth: torch.Tensor | None, code_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (codes (M, K) int8 or float8_e4m3fn, scale (M,) fp32): x * inv ~= codes * scale."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    fp8 = code_dtype == torch.float8_e4m3fn
    qmax = 448.0 if fp8 else 127.0
    q = torch.empty((m, k), device=x.device, dtype=code_dtype)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    if m == 0:
        return q, scale
    traceable(_quantize_rows_kernel)[(m,)](
        x, inv_smooth if inv_smooth is not None else x, q, scale, k, x.stride(0), q.stride(0), QMAX=qmax,
        SMOOTH=inv_smooth is not None, FP8=fp8, BLOCK_K=min(_BLOCK_K, triton.next_power_of_2(k)), num_warps=4,
    )
    return q, scale


def dequantize_int32(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``acc * row_scale[:, None] * col_scale[None, :] + bias`` in ``out_dtype``; acc (M, N) int32."""
    m, n = acc.shape
    out = torch.empty((m, n), device=acc.device, dtype=out_dtype)
    if m == 0:
        return out
    block_m, block_n = 32, 128
    traceable(_dequantize_int32_kernel)[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        acc, row_scale, col_scale, bias if bias is not None else col_scale, out, m, n, acc.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return out
