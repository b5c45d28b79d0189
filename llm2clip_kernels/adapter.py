"""Triton kernels of the lean text adapter: the memory-bound work around its cuBLAS products.

The adapter block is ``x + W2 dropout(GELU(W1 LN(x) + b1)) + b2`` (see
llm2clip_fast/models/text_adapter.py). Its four products run as ``torch.addmm``/``torch.mm`` (cuBLAS);
these kernels do everything between them, each in one pass over its rows (Liger-Kernel style):

- ``_layernorm_fwd_kernel``: per row mean and rstd in fp32, then ``xhat = (x - mean) * rstd`` (kept for
  the backward in the product dtype) and ``a = xhat * gamma + beta`` (the product's input).
- ``_gelu_dropout_fwd_kernel``: ``h = GELU(z) * keep / (1 - p)`` with exact (erf) GELU, as the official
  TextProj's ``nn.GELU()``; ``keep`` is drawn from Philox (``tl.rand``) at the element's flat index and
  a seed read from device memory, so the backward redraws the same mask and no mask is stored.
- ``_gelu_dropout_bwd_kernel``: redraws ``keep`` and recomputes GELU from the saved pre-activation ``z``:
  ``dz = dh * GELU'(z) * keep / (1 - p)`` and ``h`` again (the input of the W2 weight gradient).
- ``_layernorm_bwd_kernel``: the LayerNorm backward from ``xhat`` and ``rstd`` plus the residual
  gradient, ``a`` again (the input of the W1 weight gradient), and per-program partial sums of the
  gamma / beta gradients (summed on the host).

Math is fp32 whatever the storage dtype. Under ``TRITON_INTERPRET=1`` every load is upcast to fp32
at once (the interpreter's bf16 arithmetic is wrong) and ``tl.erf``/``tl.exp`` stand in for libdevice.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._traceable import traceable

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The LayerNorm kernels keep one whole row per program.
MAX_FUSED_DIM = 16384
# Elements per program of the GELU kernels.
_GELU_BLOCK = 1024


@triton.jit
def _gelu_and_grad(z):
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return z * cdf, cdf + z * pdf


@triton.jit
def _keep_scale(SEED, offs, p, scale):
    # keep / (1 - p) for each element: Philox at the element's flat index; the same offsets give the
    # same numbers, so forward and backward agree without a stored mask.
    seed = tl.load(SEED)
    keep = tl.rand(seed, offs) >= p
    return tl.where(keep, scale, 0.0)


@triton.jit
def _layernorm_fwd_kernel(X, GAMMA, BETA, XHAT, A, RSTD, M, D, stride_x, stride_o, eps,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask_r = rows < M
    mask_d = cols < D
    mask = mask_r[:, None] & mask_d[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    xhat = xc * rstd[:, None]
    gamma = tl.load(GAMMA + cols, mask=mask_d, other=0.0).to(tl.float32)
    beta = tl.load(BETA + cols, mask=mask_d, other=0.0).to(tl.float32)
    offs = rows[:, None] * stride_o + cols[None, :]
    tl.store(XHAT + offs, xhat.to(XHAT.dtype.element_ty), mask=mask)
    tl.store(A + offs, (xhat * gamma[None, :] + beta[None, :]).to(A.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=mask_r)


@triton.jit
def _layernorm_bwd_kernel(XHAT, RSTD, GAMMA, BETA, DLN, DRES, DX, A, DG_PART, DB_PART, DR_PART,
                          M, D, stride_xhat, stride_dln, stride_dres, stride_dx, stride_a, rows_per_program,
                          HAS_DRES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    gamma = tl.load(GAMMA + cols, mask=mask_d, other=0.0).to(tl.float32)
    beta = tl.load(BETA + cols, mask=mask_d, other=0.0).to(tl.float32)
    dg_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    dr_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < row_end
        mask = mask_r[:, None] & mask_d[None, :]
        xhat = tl.load(XHAT + rows[:, None] * stride_xhat + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dln = tl.load(DLN + rows[:, None] * stride_dln + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=mask_r, other=0.0)
        wdy = dln * gamma[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dres = tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dx += dres
            dr_acc += dres
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        a = xhat * gamma[None, :] + beta[None, :]
        tl.store(A + rows[:, None] * stride_a + cols[None, :], a.to(A.dtype.element_ty), mask=mask)
        dg_acc += dln * xhat
        db_acc += dln
    tl.store(DG_PART + pid * D + cols, tl.sum(dg_acc, axis=0), mask=mask_d)
    tl.store(DB_PART + pid * D + cols, tl.sum(db_acc, axis=0), mask=mask_d)
    if HAS_DRES:
        tl.store(DR_PART + pid * D + cols, tl.sum(dr_acc, axis=0), mask=mask_d)


@triton.jit
def _gelu_dropout_fwd_kernel(Z, H, SEED, N, p, scale, DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    h, _ = _gelu_and_grad(z)
    if DROPOUT:
        h = h * _keep_scale(SEED, offs, p, scale)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_dropout_bwd_kernel(Z, DH, DZ, H, SEED, N, p, scale, DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    h, dgelu = _gelu_and_grad(z)
    if DROPOUT:
        k = _keep_scale(SEED, offs, p, scale)
        h = h * k
        dh = dh * k
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
    tl.store(DZ + offs, (dh * dgelu).to(DZ.dtype.element_ty), mask=mask)


@triton.jit
def _keep_mask_kernel(OUT, SEED, N, p, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, _keep_scale(SEED, offs, p, scale) / scale, mask=offs < N)


# ----------------------------------------------------------------------------------------------------
# Host launchers. Row-wise tensors are 2-D with unit column stride; the GELU kernels take contiguous
# tensors (flat indices are the dropout counters).


def _rows_per_block(d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    # The interpreter pays per program: 16-row tiles. A GPU gets about 4K fp32 values per program.
    return block_d, 16 if _INTERPRET else max(1, 4096 // block_d)


def _check_dim(d: int) -> None:
    if d > MAX_FUSED_DIM:
        raise ValueError(f"the adapter's LayerNorm kernels keep a whole row per program: d={d} > {MAX_FUSED_DIM}")


def layer_norm_fwd(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                   dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xhat, rstd, a)`` of x (M, D): xhat and a = xhat * gamma + beta in ``dot_dtype``, rstd (M,) fp32."""
    m, d = x.shape
    _check_dim(d)
    x = x if x.stride(1) == 1 else x.contiguous()
    xhat = torch.empty((m, d), device=x.device, dtype=dot_dtype)
    a = torch.empty_like(xhat)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m == 0:
        return xhat, rstd, a
    block_d, block_r = _rows_per_block(d)
    traceable(_layernorm_fwd_kernel)[(triton.cdiv(m, block_r),)](
        x, gamma, beta, xhat, a, rstd, m, d, x.stride(0), d, eps,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4 if block_d <= 2048 else 8,
    )
    return xhat, rstd, a


def layer_norm_bwd(xhat: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                   dln: torch.Tensor, dres: torch.Tensor | None, dx_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, a, dgamma, dbeta, dres_sum)``: the LayerNorm backward plus ``dres`` (the residual's
    gradient) in ``dx_dtype``, ``a = xhat * gamma + beta`` again in xhat's dtype, gamma/beta gradients
    and the column sums of ``dres`` (the next Linear's bias gradient; (0,) without dres) in fp32."""
    m, d = xhat.shape
    _check_dim(d)
    dx = torch.empty((m, d), device=xhat.device, dtype=dx_dtype)
    a = torch.empty_like(xhat)
    if m == 0:
        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(n, device=xhat.device, dtype=torch.float32)

        return dx, a, zeros(d), zeros(d), zeros(d if dres is not None else 0)
    dln = dln if dln.stride(1) == 1 else dln.contiguous()
    if dres is not None and dres.stride(1) != 1:
        dres = dres.contiguous()
    block_d, block_r = _rows_per_block(d)
    if _INTERPRET:
        programs = min(m, 2)
    else:
        programs = min(m, 4 * torch.cuda.get_device_properties(xhat.device).multi_processor_count)
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)
    dg_part = torch.empty((programs, d), device=xhat.device, dtype=torch.float32)
    db_part = torch.empty_like(dg_part)
    dr_part = torch.empty((programs if dres is not None else 0, d), device=xhat.device, dtype=torch.float32)
    res = dres if dres is not None else dx
    traceable(_layernorm_bwd_kernel)[(programs,)](
        xhat, rstd, gamma, beta, dln, res, dx, a, dg_part, db_part, dr_part if dres is not None else db_part,
        m, d, xhat.stride(0), dln.stride(0), res.stride(0), dx.stride(0), a.stride(0), rows_per_program,
        HAS_DRES=dres is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4 if block_d <= 2048 else 8,
    )
    dres_sum = dr_part.sum(0) if dres is not None else dr_part.new_empty(0)
    return dx, a, dg_part.sum(0), db_part.sum(0), dres_sum


def _gelu_grid(n: int) -> tuple[int]:
    # At least one program: an empty tensor launches one that stores nothing.
    return (max(1, triton.cdiv(n, _GELU_BLOCK)),)


def gelu_dropout_fwd(z: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """``GELU(z) * keep / (1 - p)`` (keep drawn from ``seed``, an int64 (1,) tensor on z's device;
    no dropout when ``seed`` is None)."""
    z = z.contiguous()
    h = torch.empty_like(z)
    n = z.numel()
    traceable(_gelu_dropout_fwd_kernel)[_gelu_grid(n)](
        z, h, seed if seed is not None else z, n, p, 1.0 / (1.0 - p), DROPOUT=seed is not None,
        BLOCK=_GELU_BLOCK,
    )
    return h


def gelu_dropout_bwd(z: torch.Tensor, dh: torch.Tensor, seed: torch.Tensor | None, p: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dz, h, dz_sum)``: the gradient through dropout and GELU, the forward's ``h`` recomputed, and
    dz's column sums in fp32 (the bias gradient of the Linear before GELU)."""
    z = z.contiguous()
    dh = dh.contiguous()
    dz = torch.empty_like(z)
    h = torch.empty_like(z)
    n = z.numel()
    traceable(_gelu_dropout_bwd_kernel)[_gelu_grid(n)](
        z, dh, dz, h, seed if seed is not None else z, n, p, 1.0 / (1.0 - p), DROPOUT=seed is not None,
        BLOCK=_GELU_BLOCK,
    )
    return dz, h, dz.sum(0, dtype=torch.float32)


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 keep mask the GELU kernels draw for a contiguous (rows, cols) activation and ``seed``."""
    out = torch.empty((rows, cols), device=seed.device, dtype=dtype)
    n = out.numel()
    traceable(_keep_mask_kernel)[_gelu_grid(n)](out, seed, n, p, 1.0 / (1.0 - p), BLOCK=_GELU_BLOCK)
    return out
