"""Triton kernels for masked mean pooling (+ optional L2 normalisation) of (B, L, H) hidden states.

Grid: one program per (row b, block of H columns). Each program walks the sequence in BLOCK_L
chunks, multiplies the tile by the row's mask and accumulates column sums in fp32, then divides by
the number of masked positions. A second, tiny kernel computes each row's L2 norm and rescales the
row when normalisation is asked for (it needs the finished row, which spans several programs).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._traceable import traceable

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _masked_mean_pool_kernel(
    hidden_ptr,
    mask_ptr,
    out_ptr,
    L,
    H,
    stride_hb,
    stride_hl,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    col_block = tl.program_id(1)
    cols = col_block * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    count = tl.zeros((BLOCK_L,), dtype=tl.float32)
    row_hidden = hidden_ptr + row.to(tl.int64) * stride_hb
    for l0 in range(0, L, BLOCK_L):
        pos = l0 + tl.arange(0, BLOCK_L)
        pos_ok = pos < L
        m = tl.load(mask_ptr + row.to(tl.int64) * L + pos, mask=pos_ok, other=0).to(tl.float32)
        m = tl.where(m != 0, 1.0, 0.0)
        ptrs = row_hidden + pos[:, None].to(tl.int64) * stride_hl + cols[None, :]
        # Positions outside the mask are not loaded at all: on padded batches that skips their bytes.
        tile = tl.load(ptrs, mask=(pos_ok & (m != 0))[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * m[:, None], axis=0)
        count += m
    total = tl.maximum(tl.sum(count, axis=0), 1.0)
    tl.store(out_ptr + row.to(tl.int64) * H + cols, acc / total, mask=col_ok)


@triton.jit
def _row_l2_norm_kernel(out_ptr, norm_ptr, H, eps, NORMALIZE: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    base = out_ptr + row.to(tl.int64) * H
    ss = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(base + cols, mask=cols < H, other=0.0)
        ss += x * x
    n = tl.sqrt(tl.sum(ss, axis=0))
    tl.store(norm_ptr + row, n)
    if NORMALIZE:
        inv = 1.0 / tl.maximum(n, eps)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(base + cols, mask=cols < H, other=0.0)
            tl.store(base + cols, x * inv, mask=cols < H)


def masked_mean_pool_triton(
    hidden_states: torch.Tensor, mask_u8: torch.Tensor, normalize: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the pooling kernels.

    hidden_states: (B, L, H) fp32/fp16/bf16 with unit stride along H. mask_u8: (B, L) contiguous
    uint8 (nonzero = pooled). Returns ``(pooled (B, H) fp32, norm (B,) fp32)`` where ``norm`` is the
    L2 norm of the mean before normalisation (the backward of the normalisation needs it).
    """
    B, L, H = hidden_states.shape
    out = torch.empty((B, H), dtype=torch.float32, device=hidden_states.device)
    norm = torch.empty((B,), dtype=torch.float32, device=hidden_states.device)
    if B == 0:
        return out, norm
    if _INTERPRET:
        # The interpreter runs programs one by one: few, wide programs are much faster there.
        block_l, block_h, num_warps = 16, 128, 4
    else:
        block_l, block_h, num_warps = 16, 256, 4
    if H > 0:
        grid = (B, triton.cdiv(H, block_h))
        traceable(_masked_mean_pool_kernel)[grid](
            hidden_states, mask_u8, out, L, H, hidden_states.stride(0), hidden_states.stride(1),
            BLOCK_L=block_l, BLOCK_H=block_h, num_warps=num_warps,
        )
    traceable(_row_l2_norm_kernel)[(B,)](out, norm, H, eps, NORMALIZE=bool(normalize), BLOCK_H=1024 if not _INTERPRET else 256)
    return out, norm
