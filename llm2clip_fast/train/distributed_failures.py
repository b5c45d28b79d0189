"""A distributed failure in one line: which collective stopped, and which ranks are to blame.

Gloo reports a stopped peer as ``Timed out waiting 1800000ms for recv operation to complete`` and a dead
one as ``Read error [10.0.0.7]:41235: Connection reset by peer``: no collective, no rank. So every rank
of a run keeps a ledger:

- at start (:func:`open_ledger`, one all-gather) every rank learns every rank's host, machine and
  process id;
- at each point of the run whose collectives follow (:func:`at`: ``"step 12: ..."``) a rank records a
  sequence number, the point's name and the time in the rendezvous store (the key-value store that
  torchrun's agent, or rank 0 without torchrun, serves to every rank): one small store write, a few
  per step.

When a collective fails, :func:`explain` turns the failure into a :class:`DistributedFailure` (exit
code 10 on the command line) whose message names the point this rank waited at and the ranks to blame:
those of this machine whose process is stopped (SIGSTOP, a debugger) or gone, and those whose last
recorded point is behind this one (with where they are instead). Every rank that waits says it, so each
log names the culprit. The store is read for at most :data:`DIAGNOSIS_TIMEOUT_S` (not at all when its
server, rank 0, is known to be stopped or gone): a store that does not answer is itself reported.

The collectives' time limit is the process group's timeout (``--dist-timeout``). NCCL's watchdog may end
a GPU rank itself after that time (``TORCH_NCCL_ASYNC_ERROR_HANDLING``), logging the operation; the
ledger speaks wherever the failure reaches Python.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .. import distributed
from .folder_lock import machine_id

logger = logging.getLogger(__name__)

DIAGNOSIS_TIMEOUT_S = 5.0
_PREFIX = "llm2clip_fast/ledger"
# What gloo, NCCL and the store say when a peer is gone or does not answer.
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_LOST = re.compile(r"connection (reset|closed|refused)|broken pipe|read error|write error|socket|"
                        r"communicator was aborted|watchdog", re.IGNORECASE)


class DistributedFailure(RuntimeError):
    """A rank of a distributed run was lost or stopped answering (a collective failed or timed out).

    ``kind``: ``"timeout"`` or ``"lost"``; ``what``: the point of the run the collective belonged to;
    ``ranks``: the ranks the diagnosis blames (may be empty when it cannot tell)."""

    def __init__(self, message: str, *, kind: str, what: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.kind, self.what, self.ranks = kind, what, ranks


@dataclass
class _Ledger:
    store: Any
    prefix: str
    rank: int
    world: int
    timeout_s: float
    who: list[dict[str, Any]]  # every rank's host, machine and pid, learnt at start (no store needed later)
    seq: int = 0
    what: str = "start-up"
    since: float = field(default_factory=time.time)


_ledger: _Ledger | None = None


def open_ledger(timeout_s: float) -> None:
    """Start this rank's ledger (a collective: every rank calls it right after the process group
    starts). ``timeout_s``: the collectives' time limit, quoted in the failure messages. A no-op
    without a process group, or when the group has no store to keep it in."""
    global _ledger
    _ledger = None
    if not distributed.is_distributed():
        return
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError) as exc:  # a group started without a store
        logger.debug("no rendezvous store for the rank ledger: %s", exc)
        return
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = {"host": socket.gethostname(), "machine": machine_id(), "pid": os.getpid(),
            "run": uuid.uuid4().hex[:12]}
    who: list[Any] = [None] * world
    dist.all_gather_object(who, mine)
    # Rank 0's id prefixes every rank's entries: those of an earlier run in the same store never mix in.
    _ledger = _Ledger(store, f"{_PREFIX}/{who[0]['run']}", rank, world, float(timeout_s), who)
    at("start-up")


def close_ledger() -> None:
    """Forget the ledger (its entries stay in the store, which ends with the job)."""
    global _ledger
    _ledger = None


def at(what: str) -> None:
    """Record that this rank reached ``what``: a point of the run whose collectives follow, named so
    that a reader knows which collective it is (``"step 12: the stop-flag all-reduce"``). Cheap (one
    small store write); a no-op without a ledger."""
    ledger = _ledger
    if ledger is None:
        return
    ledger.seq += 1
    ledger.what, ledger.since = what, time.time()
    ledger.store.set(f"{ledger.prefix}/at/{ledger.rank}",
                     json.dumps({"seq": ledger.seq, "what": what, "t": ledger.since}))


def current_point() -> str | None:
    """The point this rank last recorded (None without a ledger)."""
    return _ledger.what if _ledger is not None else None


def collective_failure_in(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain (itself, its cause or context) that is a failed collective or
    rendezvous: torch.distributed's own error types, or a RuntimeError in gloo's/NCCL's/the store's
    words. None when there is none (the failure is something else)."""
    try:
        import torch.distributed as dist

        kinds: tuple[type[BaseException], ...] = (dist.DistError,)
    except (ImportError, AttributeError):
        kinds = ()
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        if isinstance(item, DistributedFailure):
            return None  # already explained
        if kinds and isinstance(item, kinds):
            return item
        if type(item) is RuntimeError and (_TIMEOUT.search(str(item)) or _PEER_LOST.search(str(item))):
            return item
        item = item.__cause__ or item.__context__
    return None


def _process_state(pid: int) -> str | None:
    """``stopped``, ``gone`` or ``running`` for a process of this machine; None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
    except (OSError, IndexError):
        return None
    if state in ("T", "t"):
        return "stopped"
    return "gone" if state in ("Z", "X", "x") else "running"


def _read(store: Any, key: str) -> dict[str, Any] | None:
    if not store.check([key]):
        return None
    try:
        value = json.loads(store.get(key))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _read_positions(ledger: _Ledger) -> dict[int, dict[str, Any] | None] | None:
    """Where every other rank last was, from the store; None when the store does not answer within
    :data:`DIAGNOSIS_TIMEOUT_S`. The store client's reads have no time limit of their own, so they run
    in a daemon thread that is left behind when the store's server is stopped."""
    found: dict[int, dict[str, Any] | None] = {}
    failed: list[BaseException] = []

    def read_all() -> None:
        try:
            for rank in range(ledger.world):
                if rank != ledger.rank:
                    found[rank] = _read(ledger.store, f"{ledger.prefix}/at/{rank}")
        except Exception as exc:  # the store itself failed: reported as not answering
            failed.append(exc)

    reader = threading.Thread(target=read_all, name="llm2clip_fast rank ledger", daemon=True)
    reader.start()
    reader.join(DIAGNOSIS_TIMEOUT_S)
    return None if reader.is_alive() or failed else found


def _store_served_by_rank_0() -> bool:
    """Without torchrun's agent store, rank 0's own process serves the rendezvous store."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").strip().lower() not in ("true", "1")


def _ago(t: Any) -> str:
    try:
        return f"{max(0.0, time.time() - float(t)):.0f}s ago"
    except (TypeError, ValueError):
        return "at an unknown time"


def _first_line(exc: BaseException) -> str:
    """What torch said, short: its first sentence, without gloo's ``[/path/to/file.cc:78]`` prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0][:200]


def explain(exc: BaseException) -> DistributedFailure | None:
    """The :class:`DistributedFailure` a failed collective in ``exc``'s chain amounts to, its message
    naming where this rank waited and which ranks did not come (see the module docstring); None when
    ``exc`` is no distributed failure."""
    cause = collective_failure_in(exc)
    if cause is None:
        return None
    kind = "timeout" if _TIMEOUT.search(str(cause)) else "lost"
    ledger = _ledger
    torch_says = _first_line(cause)
    if ledger is None:
        verb = "timed out" if kind == "timeout" else "failed: a rank was lost"
        return DistributedFailure(f"a collective {verb} ({torch_says})", kind=kind, what="", ranks=[])
    me, what = ledger.rank, ledger.what
    waited = f"after {time.time() - ledger.since:.0f}s" if kind == "timeout" else ""
    head = (f"rank {me}: a collective timed out {waited} (--dist-timeout {ledger.timeout_s:g}) in '{what}'"
            if kind == "timeout" else f"rank {me}: a collective failed in '{what}'")
    states = _process_states(ledger, settle_s=1.0 if kind == "lost" else 0.0)
    store_where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if _store_served_by_rank_0() and me != 0 and states.get(0) in ("stopped", "gone"):
        positions = None  # its reads would wait for a process that cannot answer
        store_note = "rank 0 serves the rendezvous store, which does not answer either"
    else:
        positions = _read_positions(ledger)
        store_note = (f"the rendezvous store at {store_where} does not answer either: the process serving it "
                      "(torchrun's agent, or rank 0 without torchrun) is stopped or gone"
                      if positions is None else "")
    blamed, notes = _diagnose(ledger, states, positions)
    if blamed:
        verdict = "; ".join(notes[r] for r in blamed)
        others = [r for r in range(ledger.world) if r != me and r not in blamed]
        tail = "; every other rank reached it" if others and positions is not None else ""
        message = f"{head}: {verdict}{tail}"
    elif positions is None:
        message = head
    else:
        message = (f"{head}: every rank recorded reaching it, so one stopped or died inside it (ranks on "
                   "other hosts cannot be checked from here: see their logs), or the network failed")
    if store_note:
        message += f"; {store_note}"
    return DistributedFailure(f"{message} [{torch_says}]", kind=kind, what=what, ranks=blamed)


def _process_states(ledger: _Ledger, settle_s: float = 0.0) -> dict[int, str | None]:
    """``stopped``, ``gone`` or ``running`` for every other rank on this machine (from /proc). A killed
    process closes its sockets before it is gone: with ``settle_s``, running ones are looked at again
    for that long, until one is seen gone."""
    here = machine_id()
    pids = {rank: int(who["pid"]) for rank, who in enumerate(ledger.who)
            if rank != ledger.rank and who.get("machine") == here and isinstance(who.get("pid"), int)}
    states = {rank: _process_state(pid) for rank, pid in pids.items()}
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and "gone" not in states.values():
        time.sleep(0.05)
        states = {rank: _process_state(pid) for rank, pid in pids.items()}
    return states


def _diagnose(ledger: _Ledger, states: dict[int, str | None],
              positions: dict[int, dict[str, Any] | None] | None) -> tuple[list[int], dict[int, str]]:
    """The ranks to blame and a note on each: stopped or gone (this machine), did not reach this
    rank's point (and where it is instead), or never recorded anything (``positions`` None: the
    store did not answer, so only the process states speak)."""
    blamed, notes = [], {}
    for rank in range(ledger.world):
        if rank == ledger.rank:
            continue
        who = ledger.who[rank]
        problems = []
        if states.get(rank) == "stopped":
            problems.append("is stopped (SIGSTOP, or a debugger holds it)")
        elif states.get(rank) == "gone":
            problems.append("is gone (its process ended: killed or crashed; its own log says why)")
        entry = positions.get(rank) if positions is not None else {}
        if entry is None:
            problems.append("never recorded where it is")
        elif positions is not None and (not isinstance(entry.get("seq"), int) or entry["seq"] < ledger.seq):
            problems.append(f"did not reach it (it is at '{entry.get('what')}', since "
                            f"{_ago(entry.get('t'))})")
        if problems:
            blamed.append(rank)
            notes[rank] = f"rank {rank} (pid {who.get('pid')} on {who.get('host')}) " + " and ".join(problems)
    return blamed, notes


__all__ = ["DIAGNOSIS_TIMEOUT_S", "DistributedFailure", "at", "close_ledger", "collective_failure_in",
           "current_point", "explain", "open_ledger"]
