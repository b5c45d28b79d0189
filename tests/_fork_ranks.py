"""Run a function on two (or more) forked gloo ranks and fail, not hang, when one of them breaks.

Forked children reuse the parent's imports, which keeps multi-rank tests to a second or two.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn: Callable[[int], Any], results, errors) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)  # the ranks share the machine's cores
    from llm2clip_fast import distributed as D

    try:
        assert D.init_distributed_from_env(backend="gloo", timeout_s=120)
        # Plain pickle bytes: the queue's own pickler would pass tensors as shared memory handles,
        # which die with the child before the parent reads them.
        results.put((rank, pickle.dumps(fn(rank))))
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        D.destroy_distributed()


def run_on_ranks(fn: Callable[[int], Any], world: int = 2, timeout_s: float = 300.0) -> list[Any]:
    """``[fn(0), ..., fn(world - 1)]``, each called on its own forked rank of a gloo process group.

    ``fn``'s results travel back pickled, so they must pickle (tensors do).
    """
    ctx = multiprocessing.get_context("fork")
    results, errors = ctx.Queue(), ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, results, errors)) for r in range(world)]
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
    messages = problems
    while not errors.empty():
        messages.append(errors.get())
    if len(got) != world or any(p.exitcode != 0 for p in procs):
        why = "\n".join(messages) or f"exit codes {[p.exitcode for p in procs]}"
        raise AssertionError(f"a rank failed or timed out:\n{why}")
    return [got[r] for r in range(world)]
