"""A pytest plugin (``-p bench._pytest_time_limit``): fail any test running past a time limit.

The limit is ``LLM2CLIP_TEST_TIME_LIMIT_S`` seconds (unset or 0: no limit). It uses SIGALRM in the
main thread, so a test stuck in Python code fails with ``TimeoutError`` and the run goes on; a test
stuck inside native code (a hung kernel) is not interrupted: the caller's own process time limit is
what catches that. Unix only. ``bench/gpu_check.py`` uses it for its ``pytest -m gpu`` stage, because
pytest-timeout is not a dependency.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator

import pytest


def _limit_s() -> float:
    raw = os.environ.get("LLM2CLIP_TEST_TIME_LIMIT_S", "").strip()
    try:
        return float(raw) if raw else 0.0
    except ValueError as exc:
        raise pytest.UsageError(
            f"LLM2CLIP_TEST_TIME_LIMIT_S must be a number of seconds, got {raw!r}") from exc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    limit = _limit_s()
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        return (yield)

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"{item.nodeid} ran past the {limit:g} s per-test limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
