"""Triton kernels of the fused SigLIP loss, and their host launchers.

Logits ``z_ij = scale * <image_i, text_j> + bias``; the positive of image row ``i`` is text column
``i + offset`` (``offset`` is the global position of this rank's first image in distributed mode,
0 otherwise), every other pair is a negative. The loss term of a pair is
``softplus(-y_ij * z_ij)`` with ``y = +1`` for the positive and ``-1`` otherwise.

- :func:`siglip_forward_rows`: one pass over (row block x column range) tiles, K-looping over the
  feature dimension, returning each image row's loss sum. No normaliser is needed (unlike CLIP's
  log-sum-exp), so one pass is the whole forward: 2*M*N*D FLOPs.
- :func:`siglip_backward`: recomputes each tile once into a row-chunked workspace holding the
  unweighted gradient ``g0_ij = -y_ij * sigmoid(-y_ij * z_ij)``, with the d(scale) and d(bias)
  partial sums as a side reduction of the tile; the two feature gradients are then
  ``torch.mm`` GEMMs on that workspace (cuBLAS runs those near peak). 6*M*N*D FLOPs; the workspace
  is bounded (``workspace_bytes``), never the M x N matrix.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm2clip_fast.fp32_matmul import mm_fp32

from . import _proxy_tuning
from ._config_fit import TileConfigs, gemm_configs
from ._proxy_tuning import capped_bucket, tune_on_proxy_once
from ._traceable import traceable

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# sm_90 configs, checked with `python -m llm2clip_fast.kernels._ptxas_report` (ptxas -v, sm_90a).
# Dropped for spilling with 16-bit operands: 128x256x64 and 256x128x64 (~2.5 KB forward, ~300 B
# backward) and 128x128x32 with 4 warps (2.2 KB forward; 8 warps do not spill). With fp32 operands
# (full-precision FMA dots) the 16-bit forward tiles spilled 2.5-23 KB: fp32 gets its own K = 16
# tiles, which spill nothing with IEEE or TF32 dots.
_FWD_TILES = TileConfigs(
    "siglip_fwd", ("img_ptr", "txt_ptr"),
    half=gemm_configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]),
    fp32=gemm_configs([(128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (64, 64, 16, 4, 3)]),
)
_BWD_TILES = TileConfigs("siglip_bwd", ("img_ptr", "txt_ptr"), half=_FWD_TILES.half, fp32=_FWD_TILES.fp32)
# The interpreter runs one program at a time and fails with several autotune configs.
_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
# The backward's partial-sum buffer is sized for the smallest tile any config uses.
_MIN_BLOCK = 32 if _INTERPRET else min(_BWD_TILES.block_min("BLOCK_M"), _BWD_TILES.block_min("BLOCK_N"))
# A forward column split starts on a block boundary for every autotuned BLOCK_N.
_SPLIT_ALIGN = 256
if _SPLIT_ALIGN % _FWD_TILES.block_max("BLOCK_N"):
    raise ValueError(f"every forward BLOCK_N must divide the column-split alignment {_SPLIT_ALIGN}")


@triton.jit
def _log1p_exp_neg_abs(x):
    # softplus(x) = max(x, 0) + log(1 + exp(-|x|)); log(1 + e) loses every e below fp32's epsilon,
    # and the many far negatives of a trained model sit exactly there, so small e uses its series.
    e = tl.exp(-tl.abs(x))
    small = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-3, small, tl.log(1.0 + e))


@triton.jit
def _logit_tile(img_ptr, txt_ptr, rows, cols, M, N, D, stride_im, stride_id, stride_tn, stride_td,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """<image_rows, text_cols> as a (BLOCK_M, BLOCK_N) fp32 tile, K-looping over D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok = rows < M
    col_ok = cols < N
    # 64-bit row offsets: B * D passes 2^31 at B = 2^20, D = 4096.
    row_off = rows.to(tl.int64)[:, None] * stride_im
    col_off = cols.to(tl.int64)[:, None] * stride_tn
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(img_ptr + row_off + ks[None, :] * stride_id,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(txt_ptr + col_off + ks[None, :] * stride_td,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's low-precision dot is wrong; upcast right after the load
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(**_FWD_TILES.autotune_args(_INTERPRET, _INTERPRET_CONFIG), key=["M_BUCKET", "N_BUCKET", "D"])
@triton.jit
def _siglip_fwd_kernel(
    img_ptr, txt_ptr, out_ptr, scale_ptr, bias_ptr,
    M, N, D, offset, cols_per_split,
    stride_im, stride_id, stride_tn, stride_td,
    M_BUCKET, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n_start = pid_s * cols_per_split
    n_end = tl.minimum(N, n_start + cols_per_split)
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        dots = _logit_tile(img_ptr, txt_ptr, rows, cols, M, N, D, stride_im, stride_id, stride_tn, stride_td,
                           BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)
        z = scale * dots + bias
        positive = cols[None, :] == rows[:, None] + offset
        term = _log1p_exp_neg_abs(tl.where(positive, -z, z))
        valid = row_ok[:, None] & (cols < n_end)[None, :]
        loss += tl.sum(tl.where(valid, term, 0.0), axis=1)
    tl.store(out_ptr + pid_s * M + rows, loss, mask=row_ok)


@triton.autotune(**_BWD_TILES.autotune_args(_INTERPRET, _INTERPRET_CONFIG), key=["M_BUCKET", "N_BUCKET", "D"],
                 reset_to_zero=["partial_ptr"])
@triton.jit
def _siglip_grad_tile_kernel(
    img_ptr, txt_ptr, g_ptr, weight_ptr, partial_ptr, scale_ptr, bias_ptr,
    M, N, D, offset, stride_w,
    stride_im, stride_id, stride_tn, stride_td, stride_gm,
    M_BUCKET, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    dots = _logit_tile(img_ptr, txt_ptr, rows, cols, M, N, D, stride_im, stride_id, stride_tn, stride_td,
                       BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)
    z = scale * dots + bias
    positive = cols[None, :] == rows[:, None] + offset
    # d softplus(-y z) / dz = -y * sigmoid(-y z): one sigmoid of -y z and a sign select. Taking
    # sigmoid(-y z) directly (not 1 - sigmoid(y z)) keeps the tiny gradients of well-separated pairs.
    sg = tl.sigmoid(tl.where(positive, -z, z))
    g0 = tl.where(positive, -sg, sg)
    valid = row_ok[:, None] & col_ok[None, :]
    g0 = tl.where(valid, g0, 0.0)
    g_off = rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
    tl.store(g_ptr + g_off, g0.to(g_ptr.dtype.element_ty), mask=valid)
    w = tl.load(weight_ptr + rows * stride_w, mask=row_ok, other=0.0)
    g = g0 * w[:, None]
    # d(scale) and d(bias) come from the tile already in registers: no scaled copy of the features.
    # Per-tile partials (summed on the host) keep the result deterministic, unlike atomics.
    slot = pid_m * tl.num_programs(1) + pid_n
    tl.store(partial_ptr + 2 * slot, tl.sum(tl.sum(g * dots, axis=1), axis=0))
    tl.store(partial_ptr + 2 * slot + 1, tl.sum(tl.sum(g, axis=1), axis=0))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (full fp32 unless the user allowed TF32); fp16/bf16
    # dots are exact products with fp32 accumulation whatever this says.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _bucket(n: int) -> int:
    # Autotune keys on powers of two so a new batch size does not re-tune every step, capped so
    # that a proxy run on TUNE_ROWS rows tunes every larger size (see _proxy_tuning).
    return capped_bucket(n)


def _scalar_f32(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.detach().reshape(1).to(device=device, dtype=torch.float32)


def siglip_forward_rows(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int = 0
) -> torch.Tensor:
    """Each image row's summed SigLIP loss over all text columns: (M,) fp32.

    image (M, D), text (N, D): same float dtype and device; scale, bias: 0-dim tensors.
    """
    M, D = image.shape
    N = text.shape[0]
    device = image.device
    t = _proxy_tuning.TUNE_ROWS
    tune_on_proxy_once("siglip_fwd", image, (M, N),
                       lambda: siglip_forward_rows(image[:t], text[:t], scale, bias, offset))
    n_blocks_min = triton.cdiv(N, _SPLIT_ALIGN)
    if _INTERPRET:
        splits = 1
    else:
        # Split the columns so that small M still fills the GPU; partial row sums are added on the host.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(n_blocks_min, triton.cdiv(4 * sms, triton.cdiv(M, 128))))
    cols_per_split = triton.cdiv(triton.cdiv(N, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = triton.cdiv(N, cols_per_split)
    out = torch.empty((splits, M), device=device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)
    traceable(_siglip_fwd_kernel)[grid](
        image, text, out, _scalar_f32(scale, device), _scalar_f32(bias, device),
        M, N, D, int(offset), cols_per_split,
        image.stride(0), image.stride(1), text.stride(0), text.stride(1),
        _bucket(M), _bucket(N),
        UPCAST=_INTERPRET, DOT_PRECISION=_dot_precision(image.dtype),
    )
    return out.sum(0) if splits > 1 else out[0]


def _chunk_rows(m: int, n: int, elem_bytes: int, workspace_bytes: int) -> int:
    rows = max(1, workspace_bytes // max(1, n * elem_bytes))
    if rows >= m:
        return m
    return max(128, rows // 128 * 128)


def siglip_backward(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    row_weight: torch.Tensor,
    offset: int = 0,
    workspace_bytes: int = 512 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_i row_weight_i * sum_j softplus(-y_ij z_ij)``.

    Returns d_image (M, D) fp32, d_text (N, D) fp32, d_scale and d_bias (0-dim fp32).
    ``row_weight`` carries the upstream gradient: a 0-dim tensor (the same for every row, e.g.
    grad/M for the mean) or an (M,) vector.
    """
    M, D = image.shape
    N = text.shape[0]
    device = image.device
    s32 = _scalar_f32(scale, device)
    b32 = _scalar_f32(bias, device)
    chunk = _chunk_rows(M, N, image.element_size(), workspace_bytes)
    # The proxy keeps the first chunk's row count, so its (M_BUCKET, N_BUCKET) key is the real one's.
    p_rows = min(chunk, _proxy_tuning.TUNE_ROWS)
    tune_on_proxy_once("siglip_bwd", image, (M, N), lambda: siglip_backward(
        image[:p_rows], text[:_proxy_tuning.TUNE_ROWS], scale, bias,
        row_weight if row_weight.dim() == 0 else row_weight[:p_rows], offset, workspace_bytes))
    work = torch.empty((chunk, N), device=device, dtype=image.dtype)
    d_image = torch.empty((M, D), device=device, dtype=torch.float32)
    d_text = torch.zeros((N, D), device=device, dtype=torch.float32)
    sums = torch.zeros(2, device=device, dtype=torch.float32)
    weight = row_weight.detach().to(device=device, dtype=torch.float32)
    uniform = weight.dim() == 0
    if uniform:
        weight = weight.reshape(1)
    for r0 in range(0, M, chunk):
        r1 = min(M, r0 + chunk)
        rows = r1 - r0
        img_c = image[r0:r1]
        g = work[:rows]
        w_c = weight if uniform else weight[r0:r1].contiguous()
        n_parts = triton.cdiv(rows, _MIN_BLOCK) * triton.cdiv(N, _MIN_BLOCK)
        partial = torch.zeros((n_parts, 2), device=device, dtype=torch.float32)
        grid = lambda meta, rows=rows: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
        traceable(_siglip_grad_tile_kernel)[grid](
            img_c, text, g, w_c, partial, s32, b32,
            rows, N, D, int(offset) - r0, 0 if uniform else 1,
            img_c.stride(0), img_c.stride(1), text.stride(0), text.stride(1), g.stride(0),
            _bucket(rows), _bucket(N),
            UPCAST=_INTERPRET, DOT_PRECISION=_dot_precision(image.dtype),
        )
        sums += partial.sum(0)
        # g holds the unweighted gradient, in (-1, 1): fp16 would flush weighted values (1/M) to zero.
        d_image[r0:r1] = mm_fp32(g, text).mul_((w_c if uniform else w_c[:, None]) * s32)
        if uniform:
            d_text.add_(mm_fp32(g.t(), img_c).mul_(w_c * s32))
        else:
            weighted = (img_c.float() * w_c[:, None]).to(image.dtype)
            d_text.add_(mm_fp32(g.t(), weighted).mul_(s32))
    return d_image, d_text, sums[0], sums[1]
