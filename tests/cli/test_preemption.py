"""SIGTERM (how SLURM and Kubernetes pre-empt a job) stops a run cleanly, and so does a folder lock taken
over by another run (issue 29, item 2).

- In the training steps, SIGTERM is handled as Ctrl-C is, but saves first: every rank stops after the
  same step (a flag all-reduced at each step boundary), a checkpoint is saved there, the run exits 143
  with one line saying where, the lock is released, and ``--resume`` continues bit-exactly.
- Outside the steps (loading) it stops at once, exit 143, nothing new saved, the lock released.
- Loader workers ignore SIGTERM (SLURM signals every process of a job): their trainer stops them.
- A run whose lock another run took over (issue 28's heartbeat only logged it) stops after the next step
  without writing anything more (exit 4), leaving the other run's lock in place.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from _ranks import fork_cli_ranks
from _stage2_runs import final_state, logged_losses, make_demo, stage2_args

from llm2clip_fast.data import build_loader
from llm2clip_fast.train import stage2
from llm2clip_fast.train.__main__ import cli
from llm2clip_fast.train.__main__ import main as train_main
from llm2clip_fast.train.folder_lock import LOCK_NAME
from llm2clip_fast.train.stop_requests import REQUESTS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("preemption"))


@pytest.fixture(autouse=True)
def _plain_errors(monkeypatch):
    monkeypatch.delenv("LLM2CLIP_DEBUG", raising=False)


def _sigterm_self() -> None:
    # Without a handler SIGTERM would end the test session itself: fail instead.
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None), \
        "the command line installed no SIGTERM handler"
    os.kill(os.getpid(), signal.SIGTERM)


def _in_step(monkeypatch, step: int, action) -> None:
    real, calls = stage2.train_step, {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(stage2, "train_step", patched)


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error:" in line]


def test_sigterm_in_a_step_saves_there_exits_143_and_resume_is_exact(demo, tmp_path, monkeypatch, capsys):
    common = ("--save-every", "0", "--caption", "random")
    train_main(stage2_args(demo, tmp_path / "full", *common, steps=4, batch=8))
    before = signal.getsignal(signal.SIGTERM)

    out = tmp_path / "stopped"
    argv = stage2_args(demo, out, *common, steps=4, batch=8)
    _in_step(monkeypatch, 2, _sigterm_self)
    capsys.readouterr()
    assert cli(argv) == 143
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [f"llm2clip_fast.train stage2: error: stopped by SIGTERM after step 2 of 4; checkpoint "
                     f"saved at {out / 'checkpoints' / 'step_00000002'}: continue with --resume"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (out / "model").exists() and not (out / LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the command line put the old handler back

    monkeypatch.undo()
    assert train_main([*argv, "--resume"]) == 0
    full, resumed = final_state(tmp_path / "full"), final_state(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert logged_losses(out) == logged_losses(tmp_path / "full")


def test_sigterm_outside_the_steps_stops_at_once(demo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_build = stage2.build_run_model

    def build_then_sigterm(*args, **kwargs):
        model = real_build(*args, **kwargs)
        _sigterm_self()
        return model

    monkeypatch.setattr(stage2, "build_run_model", build_then_sigterm)
    capsys.readouterr()
    assert cli(stage2_args(demo, out, steps=3)) == 143
    [line] = _error_lines(capsys.readouterr().err)
    assert "stopped by SIGTERM outside the training steps, so nothing new was saved" in line
    assert not (out / "checkpoints").exists() and not (out / LOCK_NAME).exists()


def test_two_ranks_stop_after_the_same_step_when_one_gets_sigterm(demo, tmp_path):
    out = tmp_path / "run"

    def prepare(rank: int) -> None:
        if rank == 1:  # only rank 1 is signalled, inside its step 2; rank 0 learns it at the boundary
            real, calls = stage2.train_step, {"n": 0}

            def patched(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                return real(*args, **kwargs)

            stage2.train_step = patched

    argv = stage2_args(demo, out, "--device", "cpu", "--save-every", "0", "--num-workers", "2",
                       "--dist-timeout", "60", batch=4, steps=6)
    results = fork_cli_ranks(argv, 2, tmp_path, prepare=prepare, timeout_s=180)
    for r in results:
        assert r.status == 143, r.output
        [line] = _error_lines(r.output)
        assert "stopped by SIGTERM after step 2 of 6; checkpoint saved at" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / LOCK_NAME).exists()


class _SigtermOnce:
    """An image transform that sends its own process SIGTERM the first time it runs (in a worker)."""

    def __init__(self, size: int) -> None:
        self.size, self.sent = size, False

    def __call__(self, image, rng):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.zeros(3, self.size, self.size)


def test_loader_workers_ignore_sigterm(demo):
    loader = build_loader(str(demo["data"]), batch_size=8, image_size=8, num_workers=2,
                          transform=_SigtermOnce(8))
    batches = list(loader)  # a worker killed by the signal: "DataLoader worker ... is killed by signal"
    assert sum(len(b["keys"]) for b in batches) == len(loader.dataset.source)


def _foreign_record() -> dict:
    now = time.time()
    return {"what": "a stage2 run", "host": "gpu-node-17", "pid": 4242, "pid_start": "1",
            "machine": "other:1", "started_at": now, "started": "now", "heartbeat": now, "token": "t" * 32}


def test_a_run_whose_lock_is_taken_over_stops_after_the_step_without_writing(demo, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.setenv("LLM2CLIP_LOCK_HEARTBEAT_SECONDS", "0.05")
    monkeypatch.setenv("LLM2CLIP_LOCK_STALE_SECONDS", "60")
    out = tmp_path / "run"
    foreign = _foreign_record()

    def taken_over() -> None:  # another run takes the lock (as after a long stall), mid-step 2
        (out / "taken").write_text(json.dumps(foreign))
        os.replace(out / "taken", out / LOCK_NAME)
        deadline = time.monotonic() + 30
        while not REQUESTS.lock_lost and time.monotonic() < deadline:  # the heartbeat notices
            time.sleep(0.02)

    _in_step(monkeypatch, 2, taken_over)
    capsys.readouterr()
    assert cli(stage2_args(demo, out, "--save-every", "1", steps=5)) == 4
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith(f"llm2clip_fast.train stage2: error: stopped after step 2 without saving: the "
                           f"lock on {out} was taken over (it is held by a stage2 run, pid 4242 on host "
                           "gpu-node-17")
    # Step 1's checkpoint was saved before; after the takeover nothing more is written.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert json.loads((out / LOCK_NAME).read_text())["token"] == foreign["token"]  # the other run's, kept
