"""``python tests/_signal_in_step.py ARGS...``: ``python -m llm2clip_fast.train ARGS...`` in which the rank
``LLM2CLIP_TEST_SIGNAL_RANK`` sends itself signal ``LLM2CLIP_TEST_SIGNAL`` (a name: SIGKILL, SIGSTOP, ...)
at the start of its optimizer step ``LLM2CLIP_TEST_SIGNAL_STEP`` of stage 2. For the torchrun tests of
tests/cli/test_distributed_failures.py; not a test module."""

from __future__ import annotations

import os
import signal
import sys

from llm2clip_fast.train import stage2
from llm2clip_fast.train.__main__ import cli

if os.environ.get("RANK") == os.environ.get("LLM2CLIP_TEST_SIGNAL_RANK", "1"):
    _real, _calls = stage2.train_step, {"n": 0}
    _step = int(os.environ.get("LLM2CLIP_TEST_SIGNAL_STEP", "3"))
    _signal = getattr(signal, os.environ["LLM2CLIP_TEST_SIGNAL"])

    def _signalled(*args, **kwargs):
        _calls["n"] += 1
        if _calls["n"] == _step:
            os.kill(os.getpid(), _signal)
        return _real(*args, **kwargs)

    stage2.train_step = _signalled

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
