"""The fused CLIP loss in pieces (part of stage ``loss_compare``): the chunk GEMMs alone against GEMM +
epilogue, the forward and the backward, recompute and keep-logits, with the second stream and without."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any

from bench.gpu_check_stages.measure import KEEP_ALL, Timer, recompute_budget
from bench.gpu_check_stages.plan import Sizes
from bench.gpu_check_stages.recorder import Recorder

BACKEND = "triton"


@dataclass
class PieceInputs:
    """The inputs, chunk plan and work buffers the pieces share at one size."""

    img: Any
    txt: Any
    scale: Any
    budget: int
    rows: int  # rows per chunk
    bounds: list[tuple[int, int]]
    logits: Any  # one chunk of float32 logits (the GEMMs' output)
    grad: Any  # one chunk of the logits' gradient
    d_image: Any
    d_text: Any
    coef: Any  # the per-row and per-column weights of the mean

    def gemms_forward(self) -> None:
        from llm2clip_fast.fp32_matmul import mm_fp32_out

        for r0, r1 in self.bounds:
            mm_fp32_out(self.img[r0:r1], self.txt.t(), self.logits[: r1 - r0])

    def gemms_backward(self, recompute: bool) -> None:
        from llm2clip_fast.fp32_matmul import addmm_fp32_, mm_fp32_out

        for r0, r1 in self.bounds:
            if recompute:
                mm_fp32_out(self.img[r0:r1], self.txt.t(), self.logits[: r1 - r0])
            mm_fp32_out(self.grad[: r1 - r0], self.txt, self.d_image[r0:r1])
            addmm_fp32_(self.d_text, self.grad[: r1 - r0].t(), self.img[r0:r1])


def piece_inputs(dev: Any, b: int, d: int) -> PieceInputs:
    import torch

    from bench.loss_throughput import make_inputs
    from llm2clip_fast.ops._chunk_schedule import chunk_bounds
    from llm2clip_fast.ops.clip_loss import plan_clip_chunks

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    img, txt = make_inputs(b, d, dev, dtype)
    budget = min(recompute_budget(b), 16 << 30)
    plan = plan_clip_chunks(b, b, dev, dtype, BACKEND, needs_grad=False, memory_budget_bytes=budget)
    return PieceInputs(
        img=img, txt=txt, scale=torch.tensor(1 / 0.07, device=dev), budget=budget, rows=plan.rows,
        bounds=chunk_bounds(b, plan.rows), logits=torch.empty(plan.rows, b, device=dev, dtype=torch.float32),
        grad=torch.rand(plan.rows, b, device=dev).to(dtype), d_image=torch.empty(b, d, device=dev),
        d_text=torch.zeros(b, d, device=dev), coef=torch.full((b,), 0.5 / b, device=dev))


def _piece(gemm_ms: float, with_epilogue_ms: float, flops: float, units: float) -> dict[str, Any]:
    """A piece's GEMM-only and GEMM + epilogue times, their rates (``units`` GEMMs of ``flops``), overhead."""
    return {"gemm_ms": gemm_ms, "gemm_tflops": units * flops / gemm_ms / 1e9,
            "with_epilogue_ms": with_epilogue_ms, "tflops": units * flops / with_epilogue_ms / 1e9,
            "epilogue_overhead": with_epilogue_ms / gemm_ms - 1}


def _epilogue_times(p: PieceInputs, timer: Timer, reps: int, lse: tuple[Any, Any],
                    overlap: str) -> tuple[float, float]:
    """Forward and (recompute) backward with their epilogues, LLM2CLIP_LOSS_OVERLAP=``overlap``."""
    from llm2clip_fast.ops.clip_loss import clip_lse_backward, clip_lse_forward

    row_lse, col_lse = lse
    os.environ["LLM2CLIP_LOSS_OVERLAP"] = overlap
    try:
        (t_f,) = timer.split([lambda: clip_lse_forward(p.img, p.txt, p.scale, backend=BACKEND,
                                                       memory_budget=p.budget)], reps=reps)
        (t_b,) = timer.split([lambda: clip_lse_backward(p.img, p.txt, p.scale, row_lse, col_lse, p.coef,
                                                        p.coef, backend=BACKEND, memory_budget=p.budget)],
                             reps=reps)
    finally:
        del os.environ["LLM2CLIP_LOSS_OVERLAP"]
    return t_f, t_b


def _keep_logits_piece(p: PieceInputs, timer: Timer, reps: int, lse: tuple[Any, Any], b: int,
                       gemm_ms: float, flops: float) -> tuple[str, dict]:
    """The keep-logits backward (second stream), or a skipped row when its logits do not fit."""
    import torch

    from llm2clip_fast.ops.clip_loss import clip_lse_backward, clip_lse_forward

    row_lse, col_lse = lse
    try:
        _, _, kept = clip_lse_forward(p.img, p.txt, p.scale, backend=BACKEND, keep_logits=True,
                                      memory_budget=KEEP_ALL)
    except torch.OutOfMemoryError as exc:
        return (f"clip pieces B={b}: backward (keep-logits)", {"status": "skipped", "note": str(exc)[:200]})
    (t_bk,) = timer.split([lambda: clip_lse_backward(p.img, p.txt, p.scale, row_lse, col_lse, p.coef, p.coef,
                                                     logits=kept, backend=BACKEND)], reps=reps)
    return (f"clip pieces B={b}: backward (keep-logits), second stream", _piece(gemm_ms, t_bk, flops, 2))


def clip_pieces(dev: Any, b: int, d: int, sizes: Sizes) -> list[tuple[str, dict]]:
    """(name, metrics) per piece of the fused CLIP loss at B, in the order measured."""
    from llm2clip_fast.ops.clip_loss import clip_lse_forward

    p = piece_inputs(dev, b, d)
    lse = clip_lse_forward(p.img, p.txt, p.scale, backend=BACKEND, memory_budget=p.budget)
    flops = 2.0 * b * b * d
    timer = Timer(dev)
    (t_gemm_f,) = timer.split([p.gemms_forward], reps=sizes.reps)
    (t_gemm_b,) = timer.split([lambda: p.gemms_backward(True)], reps=sizes.reps)
    (t_gemm_bk,) = timer.split([lambda: p.gemms_backward(False)], reps=sizes.reps)
    out: list[tuple[str, dict]] = []
    for overlap in ("1", "0"):
        t_f, t_b = _epilogue_times(p, timer, sizes.reps, lse, overlap)
        label = "second stream" if overlap == "1" else "one stream"
        out.append((f"clip pieces B={b}: forward, {label}",
                    {"chunk_rows": p.rows, "chunks": len(p.bounds), **_piece(t_gemm_f, t_f, flops, 1)}))
        out.append((f"clip pieces B={b}: backward (recompute), {label}", _piece(t_gemm_b, t_b, flops, 3)))
    out.append(_keep_logits_piece(p, timer, sizes.reps, lse, b, t_gemm_bk, flops))
    return out


def safe_pieces(rec: Recorder, dev: Any, b: int, d: int, sizes: Sizes) -> list[tuple[str, dict]]:
    """:func:`clip_pieces`, or nothing after an error row when they crash."""
    try:
        return clip_pieces(dev, b, d, sizes)
    except Exception as exc:
        rec.add_error(f"clip pieces B={b}", exc)
        traceback.print_exc()
        return []
