"""Measuring tools shared by the stages: wall times, float64 error, peak memory, freeing memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

KEEP_ALL = "1TiB"  # a memory budget that keeps the logits of every size the stages check


def recompute_budget(b: int) -> int:
    """A memory budget one byte short of B x B float32 logits: the loss takes its recompute path."""
    return 4 * b * b - 1


def rel_err(x: Any, ref: Any) -> float:
    """``max|x - ref| / max|ref|`` in float64 (``max|x - ref|`` when the reference is all zero)."""
    import torch

    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    diff = (x - ref).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


class Timer:
    """Median wall times of a callable: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def split(self, parts: list[Callable[[], Any]], reps: int) -> list[float]:
        """Run ``parts`` in order ``reps`` times (after one untimed round); median ms of each part."""
        for p in parts:
            p()
        times: list[list[float]] = [[] for _ in parts]
        for _ in range(reps):
            round_ms = self._cuda_round(parts) if self.device.type == "cuda" else self._cpu_round(parts)
            for i, ms in enumerate(round_ms):
                times[i].append(ms)
        return [statistics.median(t) for t in times]

    @staticmethod
    def _cuda_round(parts: list[Callable[[], Any]]) -> list[float]:
        import torch

        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(parts) + 1)]
        events[0].record()
        for i, p in enumerate(parts):
            p()
            events[i + 1].record()
        torch.cuda.synchronize()
        return [events[i].elapsed_time(events[i + 1]) for i in range(len(parts))]

    @staticmethod
    def _cpu_round(parts: list[Callable[[], Any]]) -> list[float]:
        out = []
        for p in parts:
            t0 = time.perf_counter()
            p()
            out.append((time.perf_counter() - t0) * 1000)
        return out


def peak_mb(fn: Callable[[], Any], device: Any) -> float | None:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    from bench._common import cuda_peak_mb

    peak, before = cuda_peak_mb(fn, device)
    return peak - before


def free_memory(dev: Any) -> None:
    """Collect garbage and, on CUDA, return cached blocks, so the next measurement starts clean."""
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
