"""The row-chunk schedule of the fused losses' torch and triton backends.

Each chunk of C rows is a GEMM ``S_c = image_c @ text.T`` (fp32 result, on the caller's stream: cuBLAS
on CUDA) followed by an epilogue over ``S_c`` that the backend supplies (Triton kernels, or torch ops),
issued on the side stream of ops/_overlap.py so it runs beside the next chunk's GEMM. Workspaces
shared by the two streams are double-buffered when overlapping; every reuse waits for the epilogue
that last read or wrote the buffer. The C++ CPU backend runs the same schedule in C++.

- :func:`run_logit_chunks` (forward): GEMM, then ``epilogue(S_c, r0, r1)``; optionally keeps every
  chunk (the keep-logits path).
- :func:`run_gradient_chunks` (backward): the chunk's logits (kept, or a GEMM), ``epilogue(S_c, G_c,
  r0, r1)`` writing the logit gradient ``G_c``, then ``d_image_c = G_c @ text`` and
  ``d_text += G_c.T @ image_c`` (cuBLAS, fp32 results).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..fp32_matmul import addmm_fp32_, mm_fp32_out
from ._overlap import make_side


def chunk_bounds(m: int, rows: int) -> list[tuple[int, int]]:
    """[(r0, r1), ...]: the row chunks of ``m`` rows, ``rows`` at a time."""
    return [(r0, min(m, r0 + rows)) for r0 in range(0, m, rows)]


def run_logit_chunks(image: Tensor, text: Tensor, rows: int, keep: bool, acc: torch.dtype,
                     epilogue: Callable[[Tensor, int, int], None]) -> Tensor:
    """Compute each chunk ``image[r0:r1] @ text.T`` in ``acc`` and hand it to ``epilogue(chunk, r0, r1)``.

    Returns the kept (M, N) logits with ``keep``, else an empty (0, N) tensor. The epilogue writes
    only into buffers that outlive this call (see ops/_overlap.py).
    """
    m, n = image.shape[0], text.shape[0]
    side = make_side(image.device)
    kept = image.new_empty((m, n) if keep else (0, n), dtype=acc)
    workspaces = [] if keep else [image.new_empty((rows, n), dtype=acc)
                                  for _ in range(2 if side.overlapping else 1)]
    tokens: list[Any] = []
    text_t = text.t()
    for k, (r0, r1) in enumerate(chunk_bounds(m, rows)):
        if keep:
            chunk = kept[r0:r1]
        else:
            if k >= len(workspaces):  # the epilogue that read this workspace last must be done
                side.wait(tokens[k - len(workspaces)])
            chunk = workspaces[k % len(workspaces)][: r1 - r0]
        mm_fp32_out(image[r0:r1], text_t, chunk)
        tokens.append(side.run(functools.partial(epilogue, chunk, r0, r1)))
    side.finish()
    return kept


def run_gradient_chunks(image: Tensor, text: Tensor, logits: Tensor, rows: int, acc: torch.dtype,
                        g_dtype: torch.dtype, epilogue: Callable[[Tensor, Tensor, int, int], None],
                        row_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per chunk: the logits (``logits[r0:r1]`` if kept, else recomputed), ``epilogue(chunk, g, r0,
    r1)`` writing G into ``g`` (``g_dtype``), then the gradient GEMMs. Returns (d_image (M, D),
    d_text (N, D)) in ``acc``, unscaled: ``G @ text`` and ``G.T @ image``.

    ``row_weight`` (M,): per-row weights applied after the GEMMs (``w_i * (G @ text)_i`` and
    ``G.T @ (w * image)``), so a 16-bit G never holds values of order 1/M.
    """
    m, d = image.shape
    n = text.shape[0]
    side = make_side(image.device)
    nbuf = 2 if side.overlapping else 1
    keep = logits.shape[0] == m and logits.numel() > 0
    logit_ws = [] if keep else [image.new_empty((rows, n), dtype=acc) for _ in range(nbuf)]
    g_ws = [image.new_empty((rows, n), dtype=g_dtype) for _ in range(nbuf)]
    d_image = image.new_empty((m, d), dtype=acc)
    d_text = image.new_zeros((n, d), dtype=acc)
    bounds = chunk_bounds(m, rows)
    text_t = text.t()

    def issue(k: int) -> Any:
        r0, r1 = bounds[k]
        if keep:
            chunk = logits[r0:r1]
        else:
            chunk = mm_fp32_out(image[r0:r1], text_t, logit_ws[k % nbuf][: r1 - r0])
        return side.run(functools.partial(epilogue, chunk, g_ws[k % nbuf][: r1 - r0], r0, r1))

    # Overlapping: chunk k+1's GEMM and epilogue are issued before chunk k's gradient GEMMs, so the
    # epilogue runs beside them. Its G buffer was last read by chunk k-1's GEMMs, issued earlier, and
    # its logit buffer by chunk k-1's epilogue, which chunk k-1's GEMMs waited for.
    ahead = 1 if side.overlapping else 0
    tokens = [issue(k) for k in range(min(ahead, len(bounds)))]
    for k, (r0, r1) in enumerate(bounds):
        if k + ahead < len(bounds):
            tokens.append(issue(k + ahead))
        side.wait(tokens[k])
        g = g_ws[k % nbuf][: r1 - r0]
        image_c = image[r0:r1]
        mm_fp32_out(g, text, d_image[r0:r1])
        if row_weight is not None:
            w = row_weight[r0:r1, None]
            d_image[r0:r1].mul_(w)
            image_c = (image_c.to(acc) * w).to(image.dtype)
        addmm_fp32_(d_text, g.t(), image_c)
    side.finish()
    return d_image, d_text
