"""Triton kernels of the fused text adapter, and their host launchers.

The adapter (see llm2clip_fast/models/text_adapter.py) is L2-normalise, then residual pre-LN blocks
``x + W2 GELU(W1 LN(x) + b1) + b2``, then LN and a projection. Kernels:

- ``_row_stats_kernel``: per-row LayerNorm mean / rstd. For the adapter input it also takes the L2 norm
  and folds the normalisation into the statistics: with ``s = max(||x||, eps)``, LN(x / s) equals
  ``(x - mean(x)) * rstd'`` where ``rstd' = 1 / (s * sqrt(var(x) / s^2 + eps_ln))``, so the normalised
  input is never written.
- ``_fused_linear_fwd_kernel``: ``out = act(f(A) @ W^T + b) [+ residual]`` where ``f`` LayerNorms each
  A tile as it is loaded (mean/rstd per row, gamma/beta per column), ``act`` is exact GELU, and the
  residual is optionally scaled per row by 1/max(norm, eps) (the first block's residual is the
  L2-normalised input, made on the fly from the raw one).
- ``_ln_gelu_bwd_kernel``: one pass over K = d for both GEMMs that share it: recomputes the pre-GELU
  ``z = LN(x) @ W1^T + b1`` and computes ``dh = dy @ W2`` tile by tile, then writes ``dz = dh * GELU'(z)``
  and ``h = GELU(z)`` (the input of the W2 weight gradient). Nothing of size B x h is kept from forward.
- ``_weight_grad_kernel``: ``dW = G^T @ f(X)`` with the same LN-on-load ``f``, and the bias gradient
  ``sum_rows G`` from the same G tiles.
- ``_layernorm_bwd_kernel``: LayerNorm backward plus the residual gradient, and for the adapter input the
  L2-normalisation backward; per-program partial sums of the LayerNorm weight / bias gradients.

The input-gradient GEMM ``dLN = dz @ W1`` has a plain epilogue and runs as torch.mm (cuBLAS) on the host.

Dot operands are rounded to the compute dtype (bf16/fp16 under autocast or with low-precision weights,
else fp32 with TF32 when torch allows it); accumulation, LayerNorm and GELU math are fp32. Under
``TRITON_INTERPRET=1`` the rounded operands are upcast to fp32 before ``tl.dot`` (the interpreter's
low-precision dot is wrong), which reproduces the GPU's fp32-accumulated product.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._config_fit import TileConfigs, gemm_configs
from ._traceable import traceable

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# The LayerNorm backward keeps one whole row per program.
MAX_FUSED_DIM = 16384


_MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_NKM = ("BLOCK_N", "BLOCK_K", "BLOCK_M")


def _interpret_config(names: tuple[str, str, str]) -> triton.Config:
    return triton.Config({names[0]: 32, names[1]: 32, names[2]: 32, "GROUP": 4}, num_warps=4, num_stages=1)


# sm_90 configs, checked with `python -m llm2clip_fast.kernels._ptxas_report` (ptxas -v, sm_90a): no
# 16-bit config spills. fp32 operands (fp32 activations, or fp32 weights without autocast) stage twice
# the bytes and, with full-precision dots, need more registers. With fp32 operands the 16-bit lists'
# forward 128x128x64 (4 stages: 188 B of spills, 225.5 of 227 KiB shared), 64x256x64 and 64x128x64
# (144-228 B), backward 64x128x64 and 128x64x64 (2-21 KB) and every weight-gradient config (8-20 KB)
# spilled, so fp32 has its own lists, spill-free with IEEE and with TF32 dots.
_FWD_TILES = TileConfigs(
    "adapter_fwd", ("A", "W"),
    half=gemm_configs([(128, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 8, 4),
                       (64, 128, 64, 4, 4)], _MNK, GROUP=8),
    fp32=gemm_configs([(128, 128, 32, 8, 4), (128, 64, 64, 8, 4)], _MNK, GROUP=8),
)
# Two fp32 accumulators per tile: smaller tiles keep them in registers.
_BWD_TILES = TileConfigs(
    "adapter_bwd", ("X", "W1", "DY", "W2"),
    half=gemm_configs([(64, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 32, 8, 4), (128, 64, 64, 8, 3)],
                      _MNK, GROUP=8),
    fp32=gemm_configs([(64, 64, 64, 8, 3), (128, 64, 32, 8, 4)], _MNK, GROUP=8),
)
_WGRAD_TILES = TileConfigs(
    "adapter_wgrad", ("G", "X"),
    half=gemm_configs([(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3)],
                      _NKM, GROUP=8),
    fp32=gemm_configs([(64, 64, 16, 4, 3), (128, 64, 16, 8, 3), (64, 128, 16, 8, 3)], _NKM, GROUP=8),
)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf + z * pdf


@triton.jit
def _row_stats_kernel(X, MEAN, RSTD, NORM, stride_x, M, D, ln_eps, l2_eps,
                      FOLD_L2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = rows < M
    ptr = X + rows[:, None] * stride_x
    s1 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(ptr + cols[None, :], mask=mask_r[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        s1 += x
        s2 += x * x
    mean = tl.sum(s1, axis=1) / D
    # Second pass for the variance: sum(x^2)/D - mean^2 cancels badly when |mean| >> std.
    sc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        m2 = mask_r[:, None] & (cols < D)[None, :]
        x = tl.load(ptr + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        diff = tl.where(m2, x - mean[:, None], 0.0)
        sc += diff * diff
    var = tl.sum(sc, axis=1) / D
    if FOLD_L2:
        norm = tl.sqrt(tl.sum(s2, axis=1))
        scale = tl.maximum(norm, l2_eps)
        rstd = 1.0 / (tl.sqrt(var / (scale * scale) + ln_eps) * scale)
        tl.store(NORM + rows, norm, mask=mask_r)
    else:
        rstd = 1.0 / tl.sqrt(var + ln_eps)
    tl.store(MEAN + rows, mean, mask=mask_r)
    tl.store(RSTD + rows, rstd, mask=mask_r)


@triton.jit
def _grouped_tile(pid, ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """(row tile, column tile) of program ``pid``, walking GROUP-row bands of tiles so neighbouring
    programs share the row operand's tiles in L2."""
    num_c = (COLS + BLOCK_C - 1) // BLOCK_C
    first_r = (pid // (GROUP * num_c)) * GROUP
    band = tl.minimum((ROWS + BLOCK_R - 1) // BLOCK_R - first_r, GROUP)
    return first_r + (pid % (GROUP * num_c)) % band, (pid % (GROUP * num_c)) // band


@triton.autotune(**_FWD_TILES.autotune_args(_INTERPRET, _interpret_config(_MNK)), key=["M", "N", "K"])
@triton.jit
def _fused_linear_fwd_kernel(
    A, MEAN, RSTD, LN_W, LN_B, W, BIAS, RES, NORM, OUT,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
    l2_eps,
    LN_INPUT: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr, RES_L2: tl.constexpr,
    DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = rm < M
    mask_n = rn < N
    if LN_INPUT:
        mean = tl.load(MEAN + rm, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + rm, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        a = tl.load(A + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        if LN_INPUT:
            gamma = tl.load(LN_W + rk, mask=mask_k, other=0.0).to(tl.float32)
            beta = tl.load(LN_B + rk, mask=mask_k, other=0.0).to(tl.float32)
            a = (a - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        w = tl.load(W + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = a.to(DOT_DTYPE)
        w = w.to(DOT_DTYPE)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    acc += tl.load(BIAS + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        r = tl.load(RES + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=out_mask, other=0.0)
        r = r.to(tl.float32)
        if RES_L2:
            norm = tl.load(NORM + rm, mask=mask_m, other=1.0)
            r = r / tl.maximum(norm, l2_eps)[:, None]
        acc += r
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(OUT.dtype.element_ty), mask=out_mask)


@triton.autotune(**_BWD_TILES.autotune_args(_INTERPRET, _interpret_config(_MNK)), key=["M", "N", "K"])
@triton.jit
def _ln_gelu_bwd_kernel(
    X, MEAN, RSTD, LN_W, LN_B, W1, B1, DY, W2, DZ, H,
    M, N, K,
    stride_xm, stride_xk, stride_w1n, stride_w1k, stride_dym, stride_dyk, stride_w2k, stride_w2n,
    stride_om, stride_on,
    DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = rm < M
    mask_n = rn < N
    mean = tl.load(MEAN + rm, mask=mask_m, other=0.0)
    rstd = tl.load(RSTD + rm, mask=mask_m, other=0.0)
    acc_z = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_dh = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        mk = mask_m[:, None] & mask_k[None, :]
        kn = mask_k[:, None] & mask_n[None, :]
        a = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mk, other=0.0).to(tl.float32)
        gamma = tl.load(LN_W + rk, mask=mask_k, other=0.0).to(tl.float32)
        beta = tl.load(LN_B + rk, mask=mask_k, other=0.0).to(tl.float32)
        a = (a - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        w1 = tl.load(W1 + rk[:, None] * stride_w1k + rn[None, :] * stride_w1n, mask=kn, other=0.0)
        a = a.to(DOT_DTYPE)
        w1 = w1.to(DOT_DTYPE)
        if UPCAST:
            a = a.to(tl.float32)
            w1 = w1.to(tl.float32)
        acc_z = tl.dot(a, w1, acc_z, input_precision=PRECISION)
        dy = tl.load(DY + rm[:, None] * stride_dym + rk[None, :] * stride_dyk, mask=mk, other=0.0)
        w2 = tl.load(W2 + rk[:, None] * stride_w2k + rn[None, :] * stride_w2n, mask=kn, other=0.0)
        dy = dy.to(DOT_DTYPE)
        w2 = w2.to(DOT_DTYPE)
        if UPCAST:
            dy = dy.to(tl.float32)
            w2 = w2.to(tl.float32)
        acc_dh = tl.dot(dy, w2, acc_dh, input_precision=PRECISION)
    z = acc_z + tl.load(B1 + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    offs = rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(H + offs, _gelu(z).to(H.dtype.element_ty), mask=out_mask)
    tl.store(DZ + offs, (acc_dh * _gelu_grad(z)).to(DZ.dtype.element_ty), mask=out_mask)


@triton.autotune(**_WGRAD_TILES.autotune_args(_INTERPRET, _interpret_config(_NKM)), key=["M", "N", "K"])
@triton.jit
def _weight_grad_kernel(
    G, X, MEAN, RSTD, LN_W, LN_B, DW, DB,
    M, N, K,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_dwn, stride_dwk,
    LN_INPUT: tl.constexpr, HAS_DB: tl.constexpr,
    DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    # dW[n, k] = sum_m G[m, n] * f(X)[m, k]: output tiles over (N, K), reduction over the M rows.
    pid = tl.program_id(0)
    pid_n, pid_k = _grouped_tile(pid, N, K, BLOCK_N, BLOCK_K, GROUP)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_n = rn < N
    mask_k = rk < K
    if LN_INPUT:
        gamma = tl.load(LN_W + rk, mask=mask_k, other=0.0).to(tl.float32)
        beta = tl.load(LN_B + rk, mask=mask_k, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rm < M
        gt = tl.load(G + rm[None, :] * stride_gm + rn[:, None] * stride_gn,
                     mask=mask_n[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        if LN_INPUT:
            mean = tl.load(MEAN + rm, mask=mask_m, other=0.0)
            rstd = tl.load(RSTD + rm, mask=mask_m, other=0.0)
            x = (x - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            # Rows past M would read as beta: G is zero there, but keep the operand clean.
            x = tl.where(mask_m[:, None], x, 0.0)
        if HAS_DB:
            db += tl.sum(gt, axis=1)
        gt = gt.to(DOT_DTYPE)
        x = x.to(DOT_DTYPE)
        if UPCAST:
            gt = gt.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(gt, x, acc, input_precision=PRECISION)
    tl.store(DW + rn[:, None] * stride_dwn + rk[None, :] * stride_dwk, acc,
             mask=mask_n[:, None] & mask_k[None, :])
    if HAS_DB:
        if pid_k == 0:
            tl.store(DB + rn, db, mask=mask_n)


@triton.jit
def _layernorm_bwd_kernel(
    X, MEAN, RSTD, NORM, LN_W, DLN, DRES, DX, DW_PART, DB_PART,
    M, D, stride_x, stride_dln, stride_dres, stride_dx, l2_eps, rows_per_program,
    HAS_DRES: tl.constexpr, FOLD_L2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    gamma = tl.load(LN_W + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    # int64 bounds keep row * stride in int64 on GPU.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < row_end
        mask = mask_r[:, None] & mask_d[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=mask_r, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mask_r, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dln = tl.load(DLN + rows[:, None] * stride_dln + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        wdy = dln * gamma[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        if FOLD_L2:
            # RSTD holds rstd(x/s)/s; the LayerNorm backward wrt x/s needs rstd(x/s) itself.
            norm = tl.load(NORM + rows, mask=mask_r, other=1.0)
            scale = tl.maximum(norm, l2_eps)
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * (rstd * scale)[:, None]
        else:
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dres = tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0)
            dx += dres.to(tl.float32)
        if FOLD_L2:
            # d/dx of x / max(||x||, eps): project out the radial part unless the clamp is active.
            x0 = x / scale[:, None]
            radial = tl.sum(x0 * dx, axis=1)
            radial = tl.where(norm > l2_eps, radial, 0.0)
            dx = (dx - x0 * radial[:, None]) / scale[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dln * xhat
        db_acc += dln
    tl.store(DW_PART + pid * D + cols, tl.sum(dw_acc, axis=0), mask=mask_d)
    tl.store(DB_PART + pid * D + cols, tl.sum(db_acc, axis=0), mask=mask_d)


# ----------------------------------------------------------------------------------------------------
# Host launchers. Tensors are 2-D; outputs are allocated here.


def _tf32_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _dot_args(dot_dtype: torch.dtype) -> dict:
    """Operand dtype and tl.dot precision: fp32 operands use TF32 only when torch allows it for matmuls."""
    if _INTERPRET:
        precision = "ieee"
    elif dot_dtype == torch.float32:
        precision = "tf32" if _tf32_allowed() else "ieee"
    else:
        precision = None  # the default; it only matters for fp32 operands
    return {"DOT_DTYPE": _TORCH_TO_TL[dot_dtype], "UPCAST": _INTERPRET, "PRECISION": precision}


def row_stats(x: torch.Tensor, ln_eps: float, l2_eps: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row LayerNorm statistics of x (M, D): fp32 (mean, rstd, norm).

    With ``l2_eps``, statistics are those of ``x / max(||x||, l2_eps)`` folded as described in the
    module docstring (``mean`` stays the raw row mean, ``rstd`` absorbs 1/s) and ``norm`` = ||x||.
    """
    m, d = x.shape
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    fold = l2_eps is not None
    norm = torch.empty(m, device=x.device, dtype=torch.float32) if fold else None
    # Several rows per program (the interpreter pays per program; the GPU gets 2-4 KiB per load).
    block_d = min(triton.next_power_of_2(d), 1024)
    block_r = 16 if _INTERPRET else max(1, 4096 // block_d)
    traceable(_row_stats_kernel)[(triton.cdiv(m, block_r),)](
        x, mean, rstd, norm if fold else mean, x.stride(0), m, d, ln_eps, l2_eps if fold else 0.0,
        FOLD_L2=fold, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return mean, rstd, norm


def fused_linear(
    a: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    ln: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    residual_norm: torch.Tensor | None = None,
    l2_eps: float = 0.0,
) -> torch.Tensor:
    """``act(f(a) @ w.T + bias) [+ residual / max(residual_norm, l2_eps)]`` -> (M, N) of ``out_dtype``.

    a: (M, K); w: (N, K) in the dot dtype; bias: (N,); ln: (mean, rstd, gamma, beta) to LayerNorm ``a``
    on load; residual: (M, N); residual_norm: (M,) row norms that scale the residual.
    """
    m, k = a.shape
    n = w.shape[0]
    out = torch.empty(m, n, device=a.device, dtype=out_dtype)
    mean, rstd, gamma, beta = ln if ln is not None else (bias, bias, bias, bias)
    res = residual if residual is not None else out
    norm = residual_norm if residual_norm is not None else bias
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    traceable(_fused_linear_fwd_kernel)[grid](
        a, mean, rstd, gamma, beta, w, bias, res, norm, out, m, n, k,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), res.stride(0), res.stride(1),
        out.stride(0), out.stride(1), l2_eps,
        LN_INPUT=ln is not None, GELU=gelu, HAS_RES=residual is not None, RES_L2=residual_norm is not None,
        **_dot_args(w.dtype),
    )
    return out


def ln_gelu_bwd(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, dy: torch.Tensor, w2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute ``z = LN(x) @ w1.T + b1`` and return ``(dz, h)``: ``(dy @ w2) * GELU'(z)`` and ``GELU(z)``.

    x, dy: (M, D); w1: (H, D), w2: (D, H) in the dot dtype; outputs (M, H) in the dot dtype.
    """
    m, d = x.shape
    hdim = w1.shape[0]
    dz = torch.empty(m, hdim, device=x.device, dtype=w1.dtype)
    h = torch.empty_like(dz)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(hdim, meta["BLOCK_N"]),)
    traceable(_ln_gelu_bwd_kernel)[grid](
        x, mean, rstd, gamma, beta, w1, b1, dy, w2, dz, h, m, hdim, d,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), dy.stride(0), dy.stride(1),
        w2.stride(0), w2.stride(1), dz.stride(0), dz.stride(1),
        **_dot_args(w1.dtype),
    )
    return dz, h


def weight_grad(
    g: torch.Tensor, x: torch.Tensor, *, dot_dtype: torch.dtype,
    ln: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g.T @ f(x), g.sum(0))`` in fp32, f = LayerNorm on load when ``ln`` = (mean, rstd, gamma, beta).

    g: (M, N), x: (M, K) -> dW (N, K), db (N,).
    """
    m, n = g.shape
    k = x.shape[1]
    dw = torch.empty(n, k, device=g.device, dtype=torch.float32)
    db = torch.empty(n, device=g.device, dtype=torch.float32)
    mean, rstd, gamma, beta = ln if ln is not None else (db, db, db, db)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    traceable(_weight_grad_kernel)[grid](
        g, x, mean, rstd, gamma, beta, dw, db, m, n, k,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1),
        LN_INPUT=ln is not None, HAS_DB=True, **_dot_args(dot_dtype),
    )
    return dw, db


def layernorm_bwd(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor, dln: torch.Tensor,
    *, dres: torch.Tensor | None = None, norm: torch.Tensor | None = None, l2_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm backward: ``(dx fp32 (M, D), dgamma fp32 (D,), dbeta fp32 (D,))``.

    dln: gradient wrt the LayerNorm output; dres: gradient reaching x directly (residual); norm: row
    norms when x is the raw adapter input (statistics folded by :func:`row_stats` with ``l2_eps``), in
    which case dx is the gradient wrt the raw input through the L2 normalisation.
    """
    m, d = x.shape
    if d > MAX_FUSED_DIM:
        raise ValueError(f"layernorm_bwd keeps a whole row per program: d={d} > {MAX_FUSED_DIM}")
    block_d = triton.next_power_of_2(d)
    if _INTERPRET:
        # The interpreter pays per program and per reduction: few programs, 16-row tiles.
        programs, block_r = min(m, 2), 16
    else:
        programs = min(m, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
        block_r = max(1, 2048 // block_d)
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)
    dx = torch.empty(m, d, device=x.device, dtype=torch.float32)
    dw_part = torch.empty(programs, d, device=x.device, dtype=torch.float32)
    db_part = torch.empty_like(dw_part)
    res = dres if dres is not None else dx
    traceable(_layernorm_bwd_kernel)[(programs,)](
        x, mean, rstd, norm if norm is not None else mean, gamma, dln, res, dx, dw_part, db_part,
        m, d, x.stride(0), dln.stride(0), res.stride(0), dx.stride(0), l2_eps, rows_per_program,
        HAS_DRES=dres is not None, FOLD_L2=norm is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4 if d <= 2048 else 8,
    )
    return dx, dw_part.sum(0), db_part.sum(0)
