"""Expected failures of ``python -m llm2clip_fast.train`` print one clear line (no traceback) and exit
with a distinct documented code; ``--debug`` or ``LLM2CLIP_DEBUG=1`` shows the traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _stage2_runs import make_demo, stage2_args

from llm2clip_fast.data.bad_data import BadDataError
from llm2clip_fast.data.embedding_cache import CacheCorruptError, StaleCacheError
from llm2clip_fast.safetensors_files import DamagedWeightsError
from llm2clip_fast.train.__main__ import cli, exit_code_for
from llm2clip_fast.train.checkpoint import CheckpointError
from llm2clip_fast.train.distributed_failures import DistributedFailure
from llm2clip_fast.train.run_folder import RunFolderError
from llm2clip_fast.train.stop_requests import LockTakenOverError, RunPreempted
from llm2clip_fast.writable_output import OutputNotWritableError

REPO = Path(__file__).resolve().parents[2]


def test_each_expected_failure_has_its_own_code():
    cases = [ValueError("x"), FileNotFoundError("x"), PermissionError("x"), OutputNotWritableError("x"),
             RunFolderError("x"), LockTakenOverError("x"), CheckpointError("x"), DamagedWeightsError("x"),
             CacheCorruptError("x"), StaleCacheError("x"), BadDataError("x"), FloatingPointError("x"),
             DistributedFailure("x", kind="timeout", what="", ranks=[]), KeyboardInterrupt(),
             RunPreempted("x")]
    codes = [exit_code_for(e) for e in cases]
    assert codes == [2, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 8, 10, 130, 143]
    assert exit_code_for(RuntimeError("a bug")) is None and exit_code_for(KeyError("a bug")) is None


def test_train_help_lists_every_exit_code(capsys):
    with pytest.raises(SystemExit):
        cli(["-h"])
    text = capsys.readouterr().out
    for code, words in [(10, "a distributed run failed: a rank was lost"), (143, "stopped by SIGTERM"),
                        (130, "interrupted (Ctrl-C)"),
                        (3, "a file or folder that does not exist, or that cannot be read or written")]:
        assert re.search(rf"^  {code} +{re.escape(words)}", text, re.MULTILINE), (code, text)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("exit_codes"))


def test_cli_turns_expected_failures_into_one_line_and_a_code(demo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("{}\n")
    monkeypatch.delenv("LLM2CLIP_DEBUG", raising=False)
    assert cli(stage2_args(demo, out)) == 4
    err = capsys.readouterr().err
    assert err.startswith("llm2clip_fast.train stage2: error: --out") and "Traceback" not in err
    assert cli(stage2_args(demo, tmp_path / "a", "--batch-size", "0")) == 2
    assert cli(stage2_args({**demo, "cache": tmp_path / "nope"}, tmp_path / "b")) == 3
    assert cli(stage2_args(demo, tmp_path / "c", "--resume")) == 5
    with pytest.raises(RunFolderError):
        cli([*stage2_args(demo, out), "--debug"])
    monkeypatch.setenv("LLM2CLIP_DEBUG", "1")
    with pytest.raises(RunFolderError):
        cli(stage2_args(demo, out))


def test_command_line_exit_code_and_debug_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("LLM2CLIP_DEBUG", None)
    argv = [sys.executable, "-m", "llm2clip_fast.train", "stage2", "--data", str(tmp_path / "missing.jsonl"),
            "--text-tower", "clip", "--out", str(tmp_path / "run"), "--no-progress"]
    plain = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 3, plain.stderr
    assert "Traceback" not in plain.stderr and "stage2: error:" in plain.stderr
    debug = subprocess.run([*argv, "--debug"], env=env, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
