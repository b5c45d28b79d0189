"""Autotune the loss kernels on a bounded proxy problem before their first large launch.

``triton.autotune`` benchmarks every config on the call that first meets a key, with that call's
own arguments: several launches per config (do_bench's estimate, warm-up and repeat). At B = 2^20,
D = 1024 one CLIP forward launch takes seconds on an H200, so the first training step spent minutes
autotuning (seen on the first H200 run of ``bench/gpu_check.py``: the B = 1,048,576 stage timed out
at 70 s). Once the batch is a few tens of thousands of rows, every program has many tiles and the
best tile shape no longer depends on B, so the launchers first run the same kernels on the leading
``TUNE_ROWS`` rows; that fills the autotuner's cache under the same key (the loss kernels key on D
and on buckets capped at ``TUNE_ROWS``) and the full-size launch reuses the winner.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch._subclasses.fake_tensor import is_fake

# 2^15 rows: a CLIP forward tile sweep over 32768 x 32768 x 1024 takes ~5 ms on an H200, long
# enough for stable timings and 2^10 times cheaper than the B = 2^20 problem.
TUNE_ROWS = 32768

_tuned: set[Hashable] = set()


def capped_bucket(n: int) -> int:
    """``n`` rounded up to a power of two, at most ``TUNE_ROWS``: the size keys of the autotuners."""
    return min(1 << max(0, (int(n) - 1).bit_length()), TUNE_ROWS)


def tune_on_proxy_once(kernel: str, tensor: torch.Tensor, sizes: tuple[int, ...],
                       run_proxy: Callable[[], object]) -> None:
    """Run ``run_proxy`` once per (kernel, D, dtype, device) if any of ``sizes`` exceeds ``TUNE_ROWS``.

    ``tensor`` is an (rows, D) operand whose width, dtype and device make the autotuner's key;
    ``run_proxy`` launches the kernel on at most ``TUNE_ROWS`` rows of each operand, with the same
    key, and its results are dropped.
    """
    if max(sizes) <= TUNE_ROWS or is_fake(tensor):
        # Fake tensors: torch.compile is tracing a triton_op; a proxy launch there would be recorded
        # into the graph and run on every call.
        return
    key = (kernel, tensor.shape[-1], tensor.dtype, tensor.device)
    if key in _tuned:
        return
    with torch.no_grad():
        run_proxy()
    _tuned.add(key)


def forget_tuning() -> None:
    """Clear the record of proxy runs (tests; the autotuners' own caches are left as they are)."""
    _tuned.clear()
