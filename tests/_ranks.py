"""The one way tests start several ranks (imported by test modules, not a test module).

Every multi-rank test goes through here, so ranks get the same environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, one thread each) and a broken rank fails its test
instead of hanging it.

- :func:`run_on_ranks`: ``fn(rank)`` on forked ranks, its return values back in the parent; with
  ``group=True`` (default) a gloo process group is up around ``fn``, with ``group=False`` ``fn`` starts
  its own (e.g. by running the trainer, see :func:`run_in_turn`).
- :func:`run_in_turn`: on a rank, ``main(argv)`` for several runs in turn, each on its own rendezvous
  port (:func:`free_ports`).
- :func:`fork_cli_ranks`: each rank a forked child calling :func:`llm2clip_fast.train.__main__.cli`
  (the parent's imports are reused: a second or two per run). ``prepare(rank)`` runs in the child first,
  e.g. to make that rank stop itself at a chosen step. Children leave with ``os._exit`` (no interpreter
  shutdown), so teardown at exit is tested with :func:`spawn_cli_ranks`.
- :func:`spawn_cli_ranks`: each rank a real ``python -m llm2clip_fast.train`` process, as torchrun starts
  them, exiting the normal way.
- :func:`free_port` / :func:`free_ports`: the rendezvous ports, also for tests that start ``torchrun``
  themselves.

The CLI launchers return a :class:`RankResult` per rank: its exit status (negative: killed by that
signal) and what it printed. A rank still running at the deadline is killed with SIGKILL and reported
with status None.

One rendezvous port per run: when the same ranks run one job after another on one port, a rank that
finished run k first can reach rank 0's store of run k (not yet torn down) for run k + 1's rendezvous,
whose keys it shares, and the ranks then wait in different collectives. Separate torchrun jobs never
share a store; neither do runs here.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RankResult:
    rank: int
    status: int | None  # exit code; -N when killed by signal N; None when it had to be killed at the deadline
    output: str


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all sockets stay bound until every port is taken, so
    the kernel cannot hand the same port out twice)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One free TCP port on 127.0.0.1: the rendezvous port of one run."""
    return free_ports(1)[0]


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _run_on_rank(rank: int, world: int, port: int, fn: Callable[[int], Any], group: bool, results,
                 errors) -> None:
    os.environ.update(_rank_env(rank, world, port))
    import torch

    torch.set_num_threads(1)  # the ranks share the machine's cores
    from llm2clip_fast import distributed as D

    try:
        if group:
            assert D.init_distributed_from_env(backend="gloo", timeout_s=120)
        # Plain pickle bytes: the queue's own pickler would pass tensors as shared memory handles,
        # which die with the child before the parent reads them.
        results.put((rank, pickle.dumps(fn(rank))))
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        D.destroy_distributed()


def run_on_ranks(fn: Callable[[int], Any], world: int = 2, *, group: bool = True,
                 timeout_s: float = 300.0) -> list[Any]:
    """``[fn(0), ..., fn(world - 1)]``, each called on its own forked rank.

    ``group=True``: a gloo process group of the ``world`` ranks is up while ``fn`` runs. ``group=False``:
    only the environment is set (``MASTER_PORT`` a fresh port), ``fn`` starts and ends process groups
    itself. ``fn``'s results travel back pickled, so they must pickle (tensors do). A rank that raises,
    dies or outlives ``timeout_s`` fails with an AssertionError carrying every rank's traceback.
    """
    ctx = multiprocessing.get_context("fork")
    results, errors = ctx.Queue(), ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_run_on_rank, args=(r, world, port, fn, group, results, errors))
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    problems: list[str] = []
    try:
        # Drain results before joining (a child blocks on exit until its queued data is read); stop
        # early when a rank died, rather than waiting out the timeout.
        deadline = time.monotonic() + timeout_s
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, value = results.get(timeout=0.5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                continue
            got[rank] = pickle.loads(value)
        if len(got) < world and time.monotonic() >= deadline:
            problems.append(f"timed out after {timeout_s:.0f}s")
        for p in procs:
            p.join(timeout=30 if len(got) == world else 1)  # a rank left behind may hang in a collective
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    while not errors.empty():
        problems.append(errors.get())
    if len(got) != world or any(p.exitcode != 0 for p in procs):
        why = "\n".join(problems) or f"exit codes {[p.exitcode for p in procs]}"
        raise AssertionError(f"a rank failed or timed out:\n{why}")
    return [got[r] for r in range(world)]


def run_in_turn(main: Callable[[list[str]], Any], runs: Iterable[Sequence[str]],
                ports: Sequence[int]) -> None:
    """On a rank of :func:`run_on_ranks` (``group=False``): ``main(argv)`` for each run in turn, run i
    rendezvousing on ``ports[i]`` (take them with :func:`free_ports` in the parent, so every rank uses
    the same ones). A run that finds a process group still up (stage 2 keeps its group) reuses it."""
    runs = list(runs)
    if len(ports) != len(runs):
        raise ValueError(f"ports must hold one port per run ({len(runs)}), got {len(ports)}")
    for port, argv in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        main(list(argv))


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
