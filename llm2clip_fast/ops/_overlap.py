"""Run the loss epilogues of chunk k beside the GEMM of chunk k+1: a second CUDA stream.

The chunked losses alternate a compute-bound cuBLAS GEMM (a chunk of logits) with a memory-bound
Triton epilogue over that chunk. :class:`SideStream` issues each epilogue on a second stream after
everything issued so far on the main stream, so the next chunk's GEMM (main) runs while it does:

- ``token = side.run(fn)``: ``fn`` launches its work on the side stream, ordered after all work
  already issued on the main stream; the token marks its end.
- ``side.wait(token)``: later main-stream work waits for that epilogue (before reading what it wrote,
  or overwriting what it reads).
- ``side.finish()``: the main stream waits for every epilogue (before the results are used).

Buffers the two streams share are allocated on the main stream before the first ``run`` and stay
alive until after ``finish``, so the caching allocator never hands their memory to other work
early; ``fn`` writes only into such buffers (its own temporaries stay on the side stream).

Without CUDA, or with ``LLM2CLIP_LOSS_OVERLAP=0``, :class:`InlineSide` runs ``fn`` at once: the
same chunk schedule, one stream. Tests drive the schedule with a side that runs ``fn`` only when
waited for (tests/_deferred_side.py), which fails any missing ``wait``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import torch

OVERLAP_ENV = "LLM2CLIP_LOSS_OVERLAP"


class Side(Protocol):
    overlapping: bool

    def run(self, fn: Callable[[], Any]) -> Any: ...

    def wait(self, token: Any) -> None: ...

    def finish(self) -> None: ...


class InlineSide:
    """Runs each epilogue at once, on the caller's stream."""

    overlapping = False

    def run(self, fn: Callable[[], Any]) -> None:
        fn()

    def wait(self, token: Any) -> None:
        pass

    def finish(self) -> None:
        pass


_SIDE_STREAMS: dict[int, Any] = {}


class SideStream:
    """Epilogues on a second CUDA stream of ``device``, ordered as the module docstring says."""

    overlapping = True

    def __init__(self, device: torch.device) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.main = torch.cuda.current_stream(index)
        if index not in _SIDE_STREAMS:
            _SIDE_STREAMS[index] = torch.cuda.Stream(index)
        self.side = _SIDE_STREAMS[index]

    def run(self, fn: Callable[[], Any]) -> Any:
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            fn()
        done = torch.cuda.Event()
        done.record(self.side)
        return done

    def wait(self, token: Any) -> None:
        self.main.wait_event(token)

    def finish(self) -> None:
        self.main.wait_stream(self.side)


def overlap_enabled() -> bool:
    """``LLM2CLIP_LOSS_OVERLAP``: unset or 1 overlaps on CUDA, 0 runs every chunk on one stream."""
    raw = os.environ.get(OVERLAP_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{OVERLAP_ENV} must be 0 or 1, got {raw!r}")
    return raw != "0"


def make_side(device: torch.device) -> Side:
    """A :class:`SideStream` for CUDA tensors, else an :class:`InlineSide`.

    Also inline while torch.compile traces (Dynamo, or a dispatch mode: fake or functional tensors
    inside a ``triton_op``): a traced graph has no streams to replay.
    """
    tracing = torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
    if device.type == "cuda" and overlap_enabled() and not tracing:
        return SideStream(device)
    return InlineSide()
