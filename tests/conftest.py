"""Test set-up shared by every test module.

Without CUDA, Triton kernels run under the interpreter; TRITON_INTERPRET must be set before any
kernel module is imported, which is why it happens here, before test modules are collected.

Under CI (``CI`` set to true/1/yes) a test skipped because the native CPU extension ``llm2clip_fast._C``
is missing, or because timm cannot be imported (``tests/_timm_environment.py``: bootstrap.sh installs it
into ``.venv/timm-site``), fails instead: a broken set-up would otherwise pass as quiet skips. Elsewhere
the closing summary counts the timm/EVA tests skipped and says how to enable them.

Every test has a time limit (``timeout`` in pyproject.toml, generous): a retry-bound or truncation bug
that loops fails its test instead of stalling the suite. pytest-timeout (the test extra installs it)
enforces it; without that plugin an alarm set here does (main thread, Unix).
"""

from __future__ import annotations

import importlib.util
import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


_HAVE_TIMEOUT_PLUGIN = importlib.util.find_spec("pytest_timeout") is not None


def pytest_addoption(parser: pytest.Parser) -> None:
    if not _HAVE_TIMEOUT_PLUGIN:  # pyproject's ``timeout`` stays a known option without the plugin
        parser.addini("timeout", "per-test time limit in seconds (enforced by conftest's alarm)", default="0")


@pytest.fixture(autouse=True)
def _time_limit(request: pytest.FixtureRequest):
    """The per-test limit where pytest-timeout is not installed: an alarm that fails the test."""
    limit = 0.0 if _HAVE_TIMEOUT_PLUGIN else float(request.config.getini("timeout") or 0)
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        pytest.fail(f"Timeout: the test ran longer than the suite's limit of {limit:g}s", pytrace=True)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# Skip reasons that mean "the build or set-up is incomplete": acceptable on a user's machine, never in CI
# (the second is tests/_timm_environment.SKIP_MARK).
_BUILD_SKIP_MARKS = ("llm2clip_fast._C", "timm is not importable")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and under_ci() and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if any(mark in reason for mark in _BUILD_SKIP_MARKS):
            report.outcome = "failed"
            report.longrepr = (f"CI requires the full set-up (native extension, timm), but the test was "
                               f"skipped: {reason}")


def _timm_skips(terminalreporter) -> list[str]:
    from _timm_environment import SKIP_MARK

    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple) and SKIP_MARK in str(report.longrepr[2]):
            reasons.append(str(report.longrepr[2]))
    return reasons


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Count the timm/EVA tests that were skipped, and say how to run them."""
    reasons = _timm_skips(terminalreporter)
    if reasons:
        why = reasons[0].split(": ", 1)[-1] if reasons[0].startswith("Skipped: ") else reasons[0]
        terminalreporter.write_sep("-", "timm/EVA tests not run", yellow=True)
        terminalreporter.write_line(f"{len(reasons)} timm/EVA test(s) skipped: {why}")
