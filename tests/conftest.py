"""Test set-up shared by every test module.

Without CUDA, Triton kernels run under the interpreter; TRITON_INTERPRET must be set before any
kernel module is imported, which is why it happens here, before test modules are collected.

Under CI (``CI`` set to true/1/yes) a test skipped because the native CPU extension ``llm2clip_fast._C``
is missing, or because timm cannot be imported (``tests/_timm_environment.py``: bootstrap.sh installs it
into ``.venv/timm-site``), fails instead: a broken set-up would otherwise pass as quiet skips.
"""

from __future__ import annotations

import os

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
