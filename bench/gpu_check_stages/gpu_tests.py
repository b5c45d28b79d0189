"""Stage ``gpu_tests``: ``pytest -m gpu`` on the test files that carry the marker, per-test time limit."""

from __future__ import annotations

import os
from typing import Any

from bench.gpu_check_stages.plan import REPO_ROOT, Sizes
from bench.gpu_check_stages.recorder import Recorder

PER_TEST_TIMEOUT_S = 30.0


def gpu_test_files() -> list[str]:
    """Test files that carry the ``gpu`` marker (collecting only them keeps the stage short)."""
    files = []
    for path in sorted((REPO_ROOT / "tests").rglob("test_*.py")):
        text = path.read_text()
        if "mark.gpu" in text:
            files.append(str(path.relative_to(REPO_ROOT)))
    return files


class LiveTestResults:
    """pytest plugin: one result row per test as it finishes, so a stage killed at its limit still
    shows every test that ran (the first H200 run lost all of them to an end-of-run junit report)."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        print(f"\nstart {nodeid}", flush=True)  # the stage log then names a test that hangs

    def pytest_runtest_logreport(self, report: Any) -> None:
        # One row per test: its call phase, or the setup/teardown phase that skipped or failed it.
        if report.when == "call" or (report.when != "call" and (report.skipped or report.failed)):
            if report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                self.rec.add(report.nodeid, "skipped", str(reason)[:200], time_s=report.duration)
            elif report.failed:
                self.rec.add(report.nodeid, "fail", str(report.longreprtext)[-400:], time_s=report.duration,
                             phase=report.when)
            else:
                self.rec.add(report.nodeid, "ok", time_s=report.duration)


def stage_gpu_tests(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    files = gpu_test_files()
    if not files:
        rec.add("pytest -m gpu", "skipped", note="no test file carries the gpu marker")
        return
    # The per-test limit comes from bench/_pytest_time_limit.py (SIGALRM in the test's thread): a
    # test stuck in Python fails with TimeoutError; one stuck inside a kernel is caught by the
    # stage's own time limit.
    import pytest

    os.environ["LLM2CLIP_TEST_TIME_LIMIT_S"] = str(PER_TEST_TIMEOUT_S)
    args = ["-q", "-m", "gpu", "-p", "bench._pytest_time_limit", "-p", "no:cacheprovider",
            "-o", "addopts=", *files]
    rec.note(f"per-test limit {PER_TEST_TIMEOUT_S:.0f} s; files: {', '.join(files)}")
    os.chdir(REPO_ROOT)
    # In this process (already the stage's own): its output goes to the stage log.
    returncode = int(pytest.main(args, plugins=[LiveTestResults(rec)]))
    # pytest: 0 all passed, 5 nothing collected (every gpu test deselected); anything else failed.
    rec.add("pytest exit", "ok" if returncode in (0, 5) else "fail", returncode=returncode)
