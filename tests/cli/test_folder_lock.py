"""Two runs never share a folder (issue 28, item 2): a run holds a lock file on its ``--out`` (and embed on
the cache it writes) for its whole life, taken atomically by rank 0 before any rank writes; a second run
is refused with one line naming the holder (exit 4), ``--overwrite`` and ``--resume`` included; a dead
run's lock is taken over (at once on the same machine, after the stated heartbeat limit elsewhere), and
says so. The lock is a file with host, pid, start time and heartbeat, so it works across the hosts of a
shared filesystem (simulated here by lock files written as another host would)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _ranks import run_on_ranks
from _stage2_runs import make_demo, stage2_args

from llm2clip_fast.train import folder_lock as fl
from llm2clip_fast.train.__main__ import cli, exit_code_for
from llm2clip_fast.train.__main__ import main as train_main
from llm2clip_fast.train.folder_lock import LOCK_NAME, FolderLock, FolderLockedError
from llm2clip_fast.train.run_folder import RunFolderError

REPO = Path(__file__).resolve().parents[2]


def _foreign_lock(folder: Path, *, heartbeat_age: float, host: str = "gpu-node-17") -> dict:
    """A lock file as a run on another host writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {"what": "a stage2 run", "host": host, "pid": 4242, "pid_start": "123", "machine": "other:1",
              "started_at": now - 3600, "started": "then", "heartbeat": now - heartbeat_age,
              "token": "t" * 32}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return record


# ---------------------------------------------------------------------------------------- the lock


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    with FolderLock(tmp_path / "run", what="a stage2 run") as lock:
        record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["token"] == lock.token and record["started_at"] <= record["heartbeat"]
        with pytest.raises(FolderLockedError) as refused:
            FolderLock(tmp_path / "run").acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"in use by a stage2 run, pid {os.getpid()} on host {socket.gethostname()}, started" in message
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    FolderLock(tmp_path / "run").acquire().release()  # free again


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = FolderLock(tmp_path, heartbeat=0.05, stale_after=1.0).acquire()
    try:
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        deadline = time.time() + 5
        while json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    finally:
        lock.release()


def test_only_one_of_many_simultaneous_takers_gets_it(tmp_path):
    start, won, refused = threading.Barrier(8), [], []

    def take():
        lock = FolderLock(tmp_path)
        start.wait()
        try:
            won.append(lock.acquire())
        except FolderLockedError:
            refused.append(lock)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    won[0].release()


def test_a_live_lock_of_another_host_is_refused(tmp_path):
    _foreign_lock(tmp_path, heartbeat_age=20)
    with pytest.raises(FolderLockedError, match=r"pid 4242 on host gpu-node-17.*last heartbeat 20s ago"):
        FolderLock(tmp_path, stale_after=300).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "gpu-node-17"  # untouched


def test_a_stale_lock_of_another_host_is_taken_over_and_says_so(tmp_path):
    _foreign_lock(tmp_path, heartbeat_age=400)
    said: list[str] = []
    with FolderLock(tmp_path, say=said.append, stale_after=300) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    assert len(said) == 1 and "taking over the lock" in said[0] and "gpu-node-17" in said[0]
    assert "last heartbeat is 400s old (more than 300s)" in said[0]


def test_the_stale_limit_is_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2CLIP_LOCK_STALE_SECONDS", "50")
    assert FolderLock(tmp_path).stale_after == 50
    _foreign_lock(tmp_path, heartbeat_age=60)
    FolderLock(tmp_path, say=lambda m: None).acquire().release()
    monkeypatch.setenv("LLM2CLIP_LOCK_STALE_SECONDS", "soon")
    with pytest.raises(ValueError, match="LLM2CLIP_LOCK_STALE_SECONDS must be a positive number"):
        FolderLock(tmp_path)


def test_a_dead_process_of_this_machine_loses_its_lock_at_once(tmp_path):
    """A run killed with SIGKILL leaves its lock file; on the same machine its pid is gone (or is a
    recycled one that started later), so the next run takes the lock without waiting for the limit."""
    with FolderLock(tmp_path):
        record = json.loads((tmp_path / LOCK_NAME).read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "pid": dead.pid, "token": "x" * 32}))
    said: list[str] = []
    FolderLock(tmp_path, say=said.append).acquire().release()
    assert f"its process {dead.pid} is no longer running on this machine" in said[0]
    # This very pid, but another process start: the pid was recycled.
    (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "pid_start": "1", "token": "y" * 32}))
    said.clear()
    FolderLock(tmp_path, say=said.append).acquire().release()
    assert "no longer running" in said[0]


def test_a_live_process_of_this_machine_keeps_its_lock_even_with_a_late_heartbeat(tmp_path):
    with FolderLock(tmp_path, heartbeat=60, stale_after=61):
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        record["heartbeat"] -= 10_000
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(FolderLockedError, match="in use by"):
            FolderLock(tmp_path, stale_after=61).acquire()


def test_without_hard_links_the_lock_is_created_with_o_excl(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(fl.os, "link", no_links)
    with FolderLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
        with pytest.raises(FolderLockedError):
            FolderLock(tmp_path).acquire()


def test_a_lock_taken_over_under_a_live_holder_is_reported_by_its_heartbeat(tmp_path, caplog):
    lock = FolderLock(tmp_path, heartbeat=60, stale_after=61).acquire()
    try:
        _foreign_lock(tmp_path, heartbeat_age=0)
        with caplog.at_level("ERROR"):
            assert lock.beat() is False
        assert lock.lost and "is no longer this run's: it is held by a stage2 run, pid 4242" in caplog.text
    finally:
        lock.release()
    assert (tmp_path / LOCK_NAME).exists()  # release leaves the other run's lock alone


# ------------------------------------------------------------------------------------------- stage2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("folder_lock"))


@pytest.mark.parametrize("how", ["--overwrite", "--resume"])
def test_a_second_stage2_on_a_folder_in_use_exits_4_naming_the_holder(demo, tmp_path, capsys, monkeypatch,
                                                                       how):
    out = tmp_path / "run"
    assert train_main(stage2_args(demo, out, "--save-every", "2", steps=2)) == 0
    monkeypatch.delenv("LLM2CLIP_DEBUG", raising=False)
    _foreign_lock(out, heartbeat_age=5)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli(stage2_args(demo, out, how, steps=2)) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"llm2clip_fast.train stage2: error: {out} is in use by a stage2 run, pid 4242 "
                             "on host gpu-node-17")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    (out / LOCK_NAME).unlink()
    assert cli(stage2_args(demo, out, how, steps=2)) == 0
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_stage2_holds_the_lock_while_it_runs(demo, tmp_path, monkeypatch):
    from llm2clip_fast.train import stage2

    out, seen = tmp_path / "run", []
    real_step = stage2.train_step

    def step_and_look(*a, **k):
        seen.append(json.loads((out / LOCK_NAME).read_text()))
        with pytest.raises(FolderLockedError):
            FolderLock(out).acquire()  # what a second run meets mid-training
        return real_step(*a, **k)

    monkeypatch.setattr(stage2, "train_step", step_and_look)
    assert train_main(stage2_args(demo, out, steps=2)) == 0
    assert [r["what"] for r in seen] == ["a stage2 run"] * 2 and seen[0]["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_a_killed_stage2_leaves_a_lock_that_resume_takes_over(demo, tmp_path):
    """SIGKILL: no cleanup runs, the lock file stays; --resume on the same machine takes it over at once."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                         os.environ.get("PYTHONPATH", "")])}
    script = (
        "import os, signal, sys\n"
        "from llm2clip_fast.train import stage2\n"
        "from llm2clip_fast.train.__main__ import main\n"
        "real = stage2.train_step\n"
        "calls = []\n"
        "def step(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "stage2.train_step = step\n"
        "main(sys.argv[1:])\n")
    argv = stage2_args(demo, out, "--save-every", "2", steps=4)
    killed = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert json.loads((out / LOCK_NAME).read_text())["pid"] != os.getpid()
    assert train_main([*argv, "--resume"]) == 0
    assert not (out / LOCK_NAME).exists()
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_overwrite_keeps_the_lock_file_and_lists_the_rest(demo, tmp_path, caplog):
    out = tmp_path / "run"
    assert train_main(stage2_args(demo, out, steps=1)) == 0
    with caplog.at_level("INFO"):
        assert train_main(stage2_args(demo, out, "--overwrite", steps=1)) == 0
    removed = next(r.getMessage() for r in caplog.records if "--overwrite: removing" in r.getMessage())
    assert LOCK_NAME not in removed and "log.jsonl" in removed


def test_the_lock_error_has_the_exit_code_of_a_folder_in_use():
    assert exit_code_for(FolderLockedError("x")) == 4


# -------------------------------------------------------------------------------------- embed, ranks


def test_embed_refuses_a_cache_another_embed_is_writing(tmp_path):
    from llm2clip_fast.train.embed import embed

    _foreign_lock(tmp_path / "cache", heartbeat_age=1)
    with pytest.raises(FolderLockedError, match=r"cache is in use by a stage2 run, pid 4242"):
        # Refused before the LLM would load: the path need not even exist.
        embed(llm=str(tmp_path / "no-llm"), data=str(tmp_path / "no-data.jsonl"), out=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [LOCK_NAME]


def _ranks_share_the_lock(folder: str):
    def on_rank(rank: int):
        from llm2clip_fast import distributed
        from llm2clip_fast.train.run_spine import hold_folder

        with hold_folder(folder, main=rank == 0, what="an embed run", say=print) as lock:
            distributed.barrier()
            holder = json.loads((Path(folder) / LOCK_NAME).read_text())
            distributed.barrier()
        refused = None
        if rank == 0:
            _foreign_lock(Path(folder), heartbeat_age=1)
        distributed.barrier()
        try:
            with hold_folder(folder, main=rank == 0, what="an embed run", say=print):
                pass
        except (FolderLockedError, RunFolderError) as exc:
            refused = (type(exc).__name__, str(exc))
        return lock is not None, holder["pid"] == os.getpid(), holder["what"], refused

    return on_rank


def test_ranks_of_one_run_share_rank_0s_lock_and_all_stop_when_it_is_refused(tmp_path):
    results = run_on_ranks(_ranks_share_the_lock(str(tmp_path / "cache")), world=2)
    assert [r[:3] for r in results] == [(True, True, "an embed run"), (False, False, "an embed run")]
    (kind0, msg0), (kind1, msg1) = results[0][3], results[1][3]
    assert kind0 == "FolderLockedError" and kind1 == "RunFolderError"
    assert "gpu-node-17" in msg0 and msg1 == f"rank 0 could not take {tmp_path / 'cache'}: {msg0}"


def test_a_run_that_fails_before_writing_leaves_no_empty_folder(demo, tmp_path):
    with pytest.raises(FileNotFoundError):
        train_main(stage2_args({**demo, "data": tmp_path / "missing.jsonl"}, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(FileNotFoundError):
        train_main(stage2_args({**demo, "data": tmp_path / "missing.jsonl"}, tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())  # the user's folder stays
