"""Stopping a run cleanly when it is asked to: SIGTERM (how SLURM and Kubernetes pre-empt a job), or the
run folder's lock taken over by another run.

SIGTERM is handled as Ctrl-C is, but saves first. While the training steps run
(:meth:`StopRequests.deferred`), the signal only records a request; at every step boundary the ranks
reduce their requests (:func:`agreed_stop`, one tiny all-reduce), so all of them stop after the same
step, save a checkpoint there and exit with :data:`SIGTERM_EXIT_CODE` (143, as shells report a
SIGTERM); ``--resume`` continues exactly. Outside the steps (loading, the final save, ``embed``) it
raises :class:`RunPreempted` at once: what was saved stays. A second SIGTERM while stopping changes nothing.

A run whose folder lock was taken over (:mod:`.folder_lock`: its heartbeat found another holder) asks to
stop the same way; the ranks then stop after the same step WITHOUT saving (the folder is another run's
now) and raise :class:`LockTakenOverError` (exit 4).

The command line installs the SIGTERM handler (:func:`handling_sigterm`, main thread only); used as a
library, a run leaves signals alone but still stops when its lock is taken over.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed
from .folder_lock import FolderLockedError

SIGTERM_EXIT_CODE = 143


class RunPreempted(Exception):
    """The run stopped on SIGTERM (exit code 143); the message says what was saved."""


class LockTakenOverError(FolderLockedError):
    """Another run took over this run's folder lock; the run stopped without writing (exit code 4)."""


@dataclass(frozen=True)
class AgreedStop:
    """What the ranks agreed at a step boundary: ``signal`` (some rank got SIGTERM: save, then stop),
    ``lock_lost`` (rank 0's lock was taken over: stop without writing), and rank 0's note on it."""

    signal: bool
    lock_lost: bool
    note: str = ""


class StopRequests:
    """This process's requests to stop (thread-safe: the lock's heartbeat thread asks too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.signal = False
        self.lock_lost = False
        self.lock_note = ""
        self._deferring = 0

    def reset(self) -> None:
        with self._lock:
            self.signal = self.lock_lost = False
            self.lock_note = ""

    def request_lock_lost(self, note: str) -> None:
        """The run's folder lock is another run's now (``note`` names it): stop at the next boundary."""
        with self._lock:
            self.lock_lost, self.lock_note = True, note

    @property
    def deferring(self) -> bool:
        return self._deferring > 0

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While the block runs (a training loop that calls :func:`agreed_stop` at every step boundary),
        SIGTERM only records a request."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def on_sigterm(self, signum: int, frame: Any) -> None:
        """The SIGTERM handler: record the request; outside :meth:`deferred`, stop at once."""
        already = self.signal
        self.signal = True
        if not self.deferring and not already:
            raise RunPreempted("stopped by SIGTERM outside the training steps, so nothing new was saved; run "
                               "the same command again (stage1/stage2 with --resume) to continue")


REQUESTS = StopRequests()


@contextlib.contextmanager
def handling_sigterm() -> Iterator[StopRequests]:
    """Handle SIGTERM as described in the module docstring for the block (main thread only; elsewhere,
    or where the signal module cannot, signals are left alone); the previous handler comes back
    after. The requests start empty."""
    REQUESTS.reset()
    if threading.current_thread() is not threading.main_thread():
        yield REQUESTS
        return
    previous = signal.signal(signal.SIGTERM, REQUESTS.on_sigterm)
    try:
        yield REQUESTS
    finally:
        signal.signal(signal.SIGTERM, previous)
        REQUESTS.reset()


def agreed_stop(device: torch.device) -> AgreedStop | None:
    """At a step boundary: whether any rank asked to stop, the same answer on every rank (a collective
    under a process group: every rank must call it at the same step). None: go on."""
    flags = [int(REQUESTS.signal), int(REQUESTS.lock_lost)]
    if distributed.get_world_size() > 1:
        import torch.distributed as dist

        both = torch.tensor(flags, dtype=torch.int64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        flags = [int(v) for v in both.tolist()]
    if not any(flags):
        return None
    note = REQUESTS.lock_note
    if flags[1] and distributed.get_world_size() > 1:
        import torch.distributed as dist

        box = [note]
        dist.broadcast_object_list(box, src=0)  # the lock is rank 0's: its note is the one to tell
        note = box[0] or ""
    return AgreedStop(signal=bool(flags[0]), lock_lost=bool(flags[1]), note=note)


def lock_taken_over(folder: Any, step: int, note: str) -> LockTakenOverError:
    """The error of a run that stopped after ``step`` because its lock on ``folder`` was taken over."""
    return LockTakenOverError(f"stopped after step {step} without saving: the lock on {folder} was taken "
                              f"over ({note or 'by another run'}), so the folder is another run's now. Stop "
                              "one of the two runs; continue this one with --resume once the folder is free")


def preempted(step: int, total: int, checkpoint: Any) -> RunPreempted:
    """The error of a run that stopped on SIGTERM after ``step`` of ``total`` and saved ``checkpoint``."""
    return RunPreempted(f"stopped by SIGTERM after step {step} of {total}; checkpoint saved at {checkpoint}: "
                        "continue with --resume")


__all__ = ["REQUESTS", "SIGTERM_EXIT_CODE", "AgreedStop", "LockTakenOverError", "RunPreempted",
           "StopRequests", "agreed_stop", "handling_sigterm", "lock_taken_over", "preempted"]
