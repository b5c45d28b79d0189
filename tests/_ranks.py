"""Multi-rank runs of the ``python -m llm2clip_fast.train`` command line for the distributed reliability
tests, bounded in time whatever happens to the ranks (imported by test modules, not a test module).

- :func:`fork_cli_ranks`: each rank a forked child calling :func:`llm2clip_fast.train.__main__.cli`
  (the parent's imports are reused: a second or two per run). ``prepare(rank)`` runs in the child first,
  e.g. to make that rank stop itself at a chosen step. Children leave with ``os._exit`` (no interpreter
  shutdown), so teardown at exit is tested with :func:`spawn_cli_ranks`.
- :func:`spawn_cli_ranks`: each rank a real ``python -m llm2clip_fast.train`` process, as torchrun starts
  them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), exiting the normal way.

Both return a :class:`RankResult` per rank: its exit status (negative: killed by that signal) and what it
printed. A rank still running at the deadline is killed with SIGKILL and reported with status None.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RankResult:
    rank: int
    status: int | None  # exit code; -N when killed by signal N; None when it had to be killed at the deadline
    output: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _forked_rank(rank: int, world: int, port: int, argv: list[str], log: str,
                 prepare: Callable[[int], None] | None, after: Callable[[int], None] | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # The parent's sys.stdout/stderr may be pytest's capture objects, not the file descriptors.
    sys.stdout = sys.stderr = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    code = 1
    try:
        os.environ.update(_rank_env(rank, world, port))
        import torch

        torch.set_num_threads(1)  # the ranks share the machine's cores
        if prepare is not None:
            prepare(rank)
        from llm2clip_fast.train.__main__ import cli

        code = cli(list(argv))
        if after is not None:
            after(rank)
    except BaseException:  # a bug: its traceback goes to the log
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _collect(procs: Sequence, logs: Sequence[Path], deadline: float, poll: Callable, kill: Callable,
             status: Callable, wait_for: Sequence[int] | None) -> list[RankResult]:
    awaited = [procs[r] for r in (range(len(procs)) if wait_for is None else wait_for)]
    while time.monotonic() < deadline and any(poll(p) is None for p in awaited):
        time.sleep(0.05)
    results = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        code = status(p) if poll(p) is not None else None
        if code is None:
            kill(p)
        results.append(RankResult(rank, code, log.read_text(errors="replace") if log.exists() else ""))
    return results


def fork_cli_ranks(argv: Sequence[str], world: int, logs_dir: Path, *, timeout_s: float = 240.0,
                   prepare: Callable[[int], None] | None = None,
                   after: Callable[[int], None] | None = None,
                   wait_for: Sequence[int] | None = None) -> list[RankResult]:
    """Run ``cli(argv)`` on ``world`` forked ranks of one gloo group: ``prepare(rank)`` before it and
    ``after(rank)`` once it returned, in the child (what they print goes to the rank's output). Waits
    for the ranks ``wait_for`` (default all) to end; every rank is gone when this returns."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    logs = [logs_dir / f"rank{r}.log" for r in range(world)]
    procs = [ctx.Process(target=_forked_rank, args=(r, world, port, list(argv), str(logs[r]), prepare, after))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, logs, time.monotonic() + timeout_s, poll=lambda p: p.exitcode,
                        kill=_kill_process, status=lambda p: p.exitcode, wait_for=wait_for)
    finally:
        for p in procs:
            _kill_process(p)


def _kill_process(p) -> None:
    if p.exitcode is None:
        try:
            os.kill(p.pid, signal.SIGKILL)  # also ends a stopped rank
        except ProcessLookupError:
            pass
        p.join(timeout=10)


def spawn_cli_ranks(argv: Sequence[str], world: int, logs_dir: Path, *, timeout_s: float = 240.0,
                    extra_env: dict[str, str] | None = None) -> list[RankResult]:
    """Run ``python -m llm2clip_fast.train *argv`` as ``world`` real processes of one gloo group.
    Every rank is gone when this returns."""
    port = free_port()
    logs = [logs_dir / f"rank{r}.log" for r in range(world)]
    env_base = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    procs = []
    try:
        for r in range(world):
            with open(logs[r], "wb") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "llm2clip_fast.train", *argv],
                                              env={**env_base, **_rank_env(r, world, port)}, cwd=REPO,
                                              stdout=out, stderr=subprocess.STDOUT))
        return _collect(procs, logs, time.monotonic() + timeout_s, poll=lambda p: p.poll(),
                        kill=lambda p: (p.kill(), p.wait()), status=lambda p: p.returncode, wait_for=None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
