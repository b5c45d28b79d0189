"""Triton kernels of the fused CLIP loss: row/column log-sum-exp of ``s * image @ text.T`` and the
gradient tile that consumes them, with the (M, N) logit matrix never held in memory.

Forward (:func:`clip_lse_forward_triton`): a persistent grid of G programs; program p walks row
blocks p, p+G, ... and, for each, all column blocks with a K-loop over D. The row log-sum-exp is
kept online in registers; the column log-sum-exp of the tiles it has seen goes to row p of a
(G, N) workspace that only program p touches (deterministic, no atomics). ``torch.logsumexp`` over
the G partials gives the column LSE. Exponentials run in base 2 (exp2/log2 are the native GPU
instructions).

Backward (:func:`clip_grad_chunk_triton`): for a chunk of rows, each program recomputes one tile,
writes ``G = row_coef * exp(s*l - row_lse) + col_coef * exp(s*l - col_lse)`` into a (C, N)
workspace and one partial of ``sum G * l`` (for d logit_scale). The host then runs two GEMMs
(cuBLAS on GPU) for d_image and d_text.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _proxy_tuning
from ._config_fit import TileConfigs, gemm_configs
from ._proxy_tuning import tune_on_proxy_once
from ._traceable import traceable

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# sm_90 configs, checked with `python -m llm2clip_fast.kernels._ptxas_report` (ptxas -v, sm_90a):
# none of the 16-bit ones spills; 128x256x64 (forward) spilled 60 bytes and was dropped. With fp32
# operands (full-precision FMA dots) the forward's 16-bit configs spilled 24-768 bytes and the
# backward's 128x128x32 24 bytes; the fp32 lists (K = 16) spill nothing with IEEE or TF32 dots.
_FWD_TILES = TileConfigs(
    "clip_fwd", ("image_ptr", "text_ptr"),
    half=gemm_configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 4)]),
    fp32=gemm_configs([(128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (64, 64, 16, 4, 3)]),
)
_BWD_TILES = TileConfigs(
    "clip_bwd", ("image_ptr", "text_ptr"),
    half=gemm_configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 3)]),
    fp32=gemm_configs([(128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (64, 64, 16, 4, 3)]),
)
_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)

# The backward partial buffer is sized for the smallest tile any config uses.
_MIN_BLOCK_M = 32 if _INTERPRET else min(_FWD_TILES.block_min("BLOCK_M"), _BWD_TILES.block_min("BLOCK_M"))
_MIN_BLOCK_N = 32 if _INTERPRET else _BWD_TILES.block_min("BLOCK_N")
# Under the interpreter a small program cap still makes a program own several row blocks.
_INTERPRET_MAX_PROGRAMS = 2


@triton.jit
def _similarity_tile(
    image_ptr, text_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_im, stride_tn,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 tile of image @ text.T, K-loop over D."""
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit row offsets: B * D passes 2^31 at B = 2^20, D = 2048.
    row_off = offs_m.to(tl.int64)[:, None] * stride_im
    col_off = offs_n.to(tl.int64)[:, None] * stride_tn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < D
        a = tl.load(image_ptr + row_off + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(text_ptr + col_off + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:  # the interpreter's low-precision dot is wrong; upcast right after the load
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(**_FWD_TILES.autotune_args(_INTERPRET, _INTERPRET_CONFIG), key=["D"], restore_value=["col_ws_ptr"])
@triton.jit
def _clip_lse_forward_kernel(
    image_ptr, text_ptr, scale_ptr, row_lse_ptr, col_ws_ptr,
    M, N, D, stride_im, stride_tn, stride_ws,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    # Work in base 2: x2 = s * l * log2(e), lse = ln(2) * log2sumexp2(x2).
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    num_col_blocks = tl.cdiv(N, BLOCK_N)
    ws_row = col_ws_ptr + pid.to(tl.int64) * stride_ws
    for rb in range(pid, num_row_blocks, n_prog):
        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for cb in range(0, num_col_blocks):
            offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            acc = _similarity_tile(image_ptr, text_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_im, stride_tn,
                                   UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            x = acc * scale2
            # Row statistics: online over column blocks (padding columns excluded).
            x_r = tl.where(mask_n[None, :], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x_r, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x_r - m_new[:, None]), 1)
            m_i = m_new
            # Column statistics of this tile (padding rows excluded), merged into this program's
            # workspace row: lse <- logaddexp2(lse, tile_lse).
            x_c = tl.where(mask_m[:, None], x, float("-inf"))
            c_max = tl.max(x_c, 0)
            c_lse = c_max + tl.log2(tl.sum(tl.exp2(x_c - c_max[None, :]), 0))
            old = tl.load(ws_row + offs_n, mask=mask_n, other=float("-inf"))
            hi = tl.maximum(old, c_lse)
            lo = tl.minimum(old, c_lse)
            tl.store(ws_row + offs_n, hi + tl.log2(1.0 + tl.exp2(lo - hi)), mask=mask_n)
        tl.store(row_lse_ptr + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)


# The autotuner launches every config on the real buffers before the winner: per-tile partials of a
# config with smaller tiles (more slots) would stay in ``part_ptr`` past the winner's last slot, so
# the buffer is zeroed before each benchmark and again before the winner runs.
@triton.autotune(**_BWD_TILES.autotune_args(_INTERPRET, _INTERPRET_CONFIG), key=["D"], reset_to_zero=["part_ptr"])
@triton.jit
def _clip_grad_tile_kernel(
    image_ptr, text_ptr, scale_ptr, row_lse_ptr, col_lse_ptr, row_coef_ptr, col_coef_ptr, g_ptr, part_ptr,
    rows, N, D, stride_im, stride_tn, stride_g,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_n = offs_n < N
    acc = _similarity_tile(image_ptr, text_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_im, stride_tn,
                           UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    row_lse2 = tl.load(row_lse_ptr + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    col_lse2 = tl.load(col_lse_ptr + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
    row_coef = tl.load(row_coef_ptr + offs_m, mask=mask_m, other=0.0)
    col_coef = tl.load(col_coef_ptr + offs_n, mask=mask_n, other=0.0)
    x = acc * scale2
    g = row_coef[:, None] * tl.exp2(x - row_lse2[:, None]) + col_coef[None, :] * tl.exp2(x - col_lse2[None, :])
    mask = mask_m[:, None] & mask_n[None, :]
    g = tl.where(mask, g, 0.0)
    # 64-bit: a C x N workspace chunk can pass 2^31 elements (the CUDA chunk budget is 2 GiB).
    g_off = offs_m.to(tl.int64)[:, None] * stride_g + offs_n[None, :]
    tl.store(g_ptr + g_off, g.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(g * acc, 1), 0))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (full fp32 unless the user allowed TF32);
    # fp16/bf16 dots are exact products with fp32 accumulation whatever this says.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _max_programs(device: torch.device) -> int:
    if _INTERPRET:
        return _INTERPRET_MAX_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def clip_lse_forward_triton(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row LSE (M,) and column LSE (N,) of ``logit_scale * image @ text.T``, both fp32.

    image (M, D), text (N, D): contiguous, same floating dtype, same device; logit_scale: 0-dim.
    Extra memory: a (G, N) fp32 workspace, G <= 2 * #SMs.
    """
    m, d = image.shape
    n = text.shape[0]
    t = _proxy_tuning.TUNE_ROWS
    tune_on_proxy_once("clip_fwd", image, (m, n), lambda: clip_lse_forward_triton(image[:t], text[:t], logit_scale))
    # G does not depend on the tuned BLOCK_M, so the workspace shape is fixed; programs left
    # without a row block keep their -inf row, which drops out of the logsumexp.
    g = max(1, min(_max_programs(image.device), triton.cdiv(m, _MIN_BLOCK_M)))
    row_lse = torch.empty(m, device=image.device, dtype=torch.float32)
    col_ws = torch.full((g, n), float("-inf"), device=image.device, dtype=torch.float32)
    traceable(_clip_lse_forward_kernel)[(g,)](
        image, text, logit_scale, row_lse, col_ws,
        m, n, d, image.stride(0), text.stride(0), col_ws.stride(0),
        UPCAST=_INTERPRET and image.dtype != torch.float32, DOT_PRECISION=_dot_precision(image.dtype),
    )
    # The workspace holds base-2 LSEs: ln-sum-exp of (w * ln 2) is the natural-log column LSE.
    col_lse = torch.logsumexp(col_ws * _LN2, dim=0)
    return row_lse, col_lse


def clip_grad_chunk_triton(
    image_chunk: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    row_coef: torch.Tensor,
    col_coef: torch.Tensor,
    g_out: torch.Tensor,
) -> torch.Tensor:
    """Write G for ``image_chunk`` (C, D) against all of ``text`` (N, D) into ``g_out`` (C, N).

    row_lse/row_coef: (C,) fp32 for the chunk's rows; col_lse/col_coef: (N,) fp32. Returns the
    0-dim fp32 ``sum_ij G_ij * l_ij`` of the chunk (l the unscaled similarity).
    """
    rows, d = image_chunk.shape
    n = text.shape[0]
    t_r, t_n = min(rows, _proxy_tuning.TUNE_ROWS), min(n, _proxy_tuning.TUNE_ROWS)
    # The proxy writes into the top-left corner of g_out, which the full launch then overwrites.
    tune_on_proxy_once("clip_bwd", image_chunk, (rows, n), lambda: clip_grad_chunk_triton(
        image_chunk[:t_r], text[:t_n], logit_scale, row_lse[:t_r], col_lse[:t_n], row_coef[:t_r],
        col_coef[:t_n], g_out[:t_r, :t_n]))
    parts = torch.zeros(triton.cdiv(rows, _MIN_BLOCK_M) * triton.cdiv(n, _MIN_BLOCK_N),
                        device=image_chunk.device, dtype=torch.float32)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    traceable(_clip_grad_tile_kernel)[grid](
        image_chunk, text, logit_scale, row_lse, col_lse, row_coef, col_coef, g_out, parts,
        rows, n, d, image_chunk.stride(0), text.stride(0), g_out.stride(0),
        UPCAST=_INTERPRET and image_chunk.dtype != torch.float32, DOT_PRECISION=_dot_precision(image_chunk.dtype),
    )
    return parts.sum()
