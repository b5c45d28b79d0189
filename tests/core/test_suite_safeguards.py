"""The test suite guards itself (issue 29, items 5 and 6): no test can stall CI (a per-test time limit), and
the timm/EVA tests that skip where timm is not installed say how to enable them and are counted in the
closing summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_test_has_a_generous_time_limit(request):
    assert float(request.config.getini("timeout")) == 900  # pyproject.toml: a hang fails after 15 minutes
    assert request.config.pluginmanager.hasplugin("timeout"), "the test extra installs pytest-timeout"


def test_a_hanging_test_fails_instead_of_stalling_the_suite(tmp_path):
    test = tmp_path / "test_hangs.py"
    test.write_text("import time\n\ndef test_hangs():\n    time.sleep(120)\n")
    # The project's pytest configuration, its limit lowered to 2 s for this check.
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir",
                          str(REPO), str(test), "-q", "-p", "no:cacheprovider", "-o", "timeout=2"],
                         capture_output=True, text=True, timeout=90, cwd=REPO)
    assert run.returncode == 1 and "Timeout" in run.stdout and "1 failed" in run.stdout, run.stdout


def test_timm_skips_say_how_to_enable_them_and_are_counted(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["LLM2CLIP_TIMM_SITE"] = str(tmp_path / "no-timm-here")
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/models/test_vision_timm.py", "-q", "-p",
                          "no:cacheprovider"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    skipped = re.search(r"(\d+) skipped", run.stdout)
    assert run.returncode == 0 and skipped, run.stdout
    counted = re.search(r"^(\d+) timm/EVA test\(s\) skipped: timm is not importable: "
                        r".*run scripts/bootstrap\.sh.*LLM2CLIP_TIMM_SITE", run.stdout, re.MULTILINE)
    assert counted and counted.group(1) == skipped.group(1), run.stdout
