"""Stand-ins for the loss epilogues' CUDA side stream (llm2clip_fast/ops/_overlap.py), on CPU.

:class:`DeferredSide` runs each epilogue only when the schedule waits for it (or at ``finish``): as if
the side stream were arbitrarily late. A schedule that overwrites a buffer an epilogue still has to
read, or reads what an epilogue has yet to write, then computes a wrong result, which the tests see.
:class:`ForgetfulSide` also ignores every ``wait`` (all epilogues run at ``finish``): the control that
shows the deferral has teeth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llm2clip_fast.ops import _chunk_schedule


class DeferredSide:
    overlapping = True

    def __init__(self) -> None:
        self.queue: list[Callable[[], Any]] = []
        self.done = 0
        self.waits = 0

    def run(self, fn: Callable[[], Any]) -> int:
        self.queue.append(fn)
        return len(self.queue) - 1

    def wait(self, token: int) -> None:
        self.waits += 1
        while self.done <= token:
            self.queue[self.done]()
            self.done += 1

    def finish(self) -> None:
        while self.done < len(self.queue):
            self.queue[self.done]()
            self.done += 1


class ForgetfulSide(DeferredSide):
    def wait(self, token: int) -> None:
        self.waits += 1


def use_side(monkeypatch: pytest.MonkeyPatch, kind: type[DeferredSide]) -> list[DeferredSide]:
    """Make the chunk schedule use ``kind`` sides; returns the list of sides it creates."""
    made: list[DeferredSide] = []

    def make(device: Any) -> DeferredSide:
        made.append(kind())
        return made[-1]

    monkeypatch.setattr(_chunk_schedule, "make_side", make)
    return made
