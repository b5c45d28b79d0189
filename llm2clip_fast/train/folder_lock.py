"""A lock on a folder a run writes (a trainer's ``--out``, an embedding cache being built), held for the
life of the run, that works across hosts on a shared filesystem.

Two runs writing one folder lose data: ``--overwrite`` deletes the checkpoints of a run still training,
two ``--resume`` of one folder write the same checkpoints. A local ``fcntl`` lock does not see a run on
another node of an NFS or Lustre mount, so the lock is a file, ``FOLDER/.llm2clip_fast.lock``:

- created atomically: written under a temporary name, then hard-linked to the lock name (``link``
  fails when the name exists, atomically even on NFS); where the filesystem has no hard links, created
  with ``O_CREAT | O_EXCL``;
- it names its holder: host, process id (and that process's start time, so a recycled pid is not
  mistaken for it), when the run started, what it is, and a heartbeat: a daemon thread rewrites the file
  every :data:`HEARTBEAT_SECONDS` (30 s) with the time;
- a second run is refused with one line naming the holder (:class:`FolderLockedError`, exit code 4 on
  the command line), ``--overwrite`` and ``--resume`` included;
- a lock left by a run that died is taken over, with a message saying whose it was and why: at once
  when the holder ran on this machine and its process is gone; otherwise once the heartbeat is older than
  :data:`STALE_AFTER_SECONDS` (300 s; ``LLM2CLIP_LOCK_STALE_SECONDS`` changes it). Hosts' clocks must
  agree to well within that limit. A process of this machine that is alive keeps its lock even with a
  stale heartbeat (a stopped job that resumes would write again). Two processes taking over one stale
  lock at once serialise on ``.llm2clip_fast.lock.takeover`` (created the same atomic way);
- released (the file removed, only if it is still this holder's) when the run ends, however it ends
  short of a kill; a kill leaves the file, which the next run takes over as above.

Under ``torchrun`` rank 0 takes the lock for the whole run before any rank writes, and every rank learns
the verdict (:func:`~.run_spine.hold_folder`), so the ranks of one run share it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..redaction import redact

logger = logging.getLogger(__name__)

LOCK_NAME = ".llm2clip_fast.lock"
TAKEOVER_SUFFIX = ".takeover"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
# A takeover takes milliseconds: a takeover marker older than this was left by a process that died in it.
_TAKEOVER_STALE_SECONDS = 60.0


class FolderLockedError(RuntimeError):
    """Another run holds the folder's lock (the message names it), or it could not be taken."""


def is_lock_file(name: str) -> bool:
    """Whether ``name`` is the lock file or its takeover marker (never a run's content)."""
    return name in (LOCK_NAME, LOCK_NAME + TAKEOVER_SUFFIX)


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {text!r}")
    return value


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat; fields[0] is field 3 (the state)
    except (OSError, IndexError):
        return None


def _process_state(pid: int) -> str | None:
    """``"alive"``, ``"gone"`` (no such process, or a zombie), or None when this cannot be told."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return "gone" if state in ("Z", "X") else "alive"
    except FileNotFoundError:
        return "gone"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "alive"
    except OSError:
        return None
    return "alive"


def machine_id() -> str:
    """What tells this machine (and pid namespace) apart from others that may share a host name:
    the kernel's boot id and the pid namespace. Processes are only judged by pid on the same one."""
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("no-boot-id")
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        parts.append("no-pidns")
    return ":".join(parts)


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_holder(record: dict[str, Any]) -> str:
    """``stage2 run, pid 123 on host gpu-07, started 2026-01-02 03:04:05 UTC`` from a lock record."""
    what = record.get("what") or "a run"
    started = record.get("started_at")
    since = f", started {_iso(started)}" if isinstance(started, (int, float)) else ""
    return redact(f"{what}, pid {record.get('pid')} on host {record.get('host')}{since}")


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` atomically; False when it already exists."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS,
                             errno.EMLINK):
            raise
    finally:
        tmp.unlink(missing_ok=True)
    # No hard links here (some FUSE mounts, SMB): O_EXCL, then the content.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _age_of_file(path: Path) -> float | None:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None


class FolderLock:
    """The lock on ``folder`` (created if missing); see the module docstring.

    Args:
        folder: the folder the run writes.
        what: what the holder is, for the message another run gets (``"stage2 run"``).
        say: where the takeover of a dead run's lock is reported (a logger's ``info``/``warning``).
        stale_after, heartbeat: seconds; default :data:`STALE_AFTER_SECONDS` (or
            ``LLM2CLIP_LOCK_STALE_SECONDS``) and :data:`HEARTBEAT_SECONDS` (or
            ``LLM2CLIP_LOCK_HEARTBEAT_SECONDS``).

    Use as a context manager, or :meth:`acquire` / :meth:`release`. ``lost`` becomes True when the
    heartbeat finds the lock taken over by another process (logged as an error), and ``on_lost`` is
    then called once, from the heartbeat thread, with the new holder's description (the trainers ask
    their run to stop at the next step boundary, :mod:`.stop_requests`).
    """

    def __init__(self, folder: str | os.PathLike[str], *, what: str = "a run",
                 say: Callable[[str], None] | None = None, stale_after: float | None = None,
                 heartbeat: float | None = None, on_lost: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.say = say or logger.warning
        self.on_lost = on_lost
        self.stale_after = (stale_after if stale_after is not None
                            else _seconds_from_env("LLM2CLIP_LOCK_STALE_SECONDS", STALE_AFTER_SECONDS))
        self.heartbeat = (heartbeat if heartbeat is not None
                          else _seconds_from_env("LLM2CLIP_LOCK_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS))
        if not self.stale_after > self.heartbeat > 0:
            raise ValueError(f"the lock's stale limit ({self.stale_after}s) must exceed its heartbeat "
                             f"({self.heartbeat}s)")
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False
        self._created_folder = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict[str, Any] = {}

    # -- the record ---------------------------------------------------------------------------

    def _new_record(self) -> dict[str, Any]:
        now = time.time()
        pid = os.getpid()
        return {"what": self.what, "host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
                "machine": machine_id(), "started_at": now, "started": _iso(now), "heartbeat": now,
                "token": self.token}

    def read(self) -> dict[str, Any] | None:
        """The lock file's record, or None when there is none (or it cannot be read as one)."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    # -- taking and giving back ---------------------------------------------------------------

    def acquire(self) -> FolderLock:
        """Take the lock, taking over a dead holder's; :class:`FolderLockedError` naming a live one."""
        if self.held:
            raise RuntimeError(f"the lock on {self.folder} is already held by this object")
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self._record = self._new_record()
            if _create_exclusive(self.path, self._encode(self._record)):
                self.held = True
                self._start_heartbeat()
                return self
            holder = self.read()
            if holder is None:
                age = _age_of_file(self.path)
                if age is None:
                    continue  # released between our try and our read: try again
                if age <= self.stale_after:
                    self._remove_created_folder()
                    raise FolderLockedError(
                        f"{self.folder} is locked by another run ({self.path} is being written or is "
                        f"unreadable, {age:.0f}s old); it is taken over once older than "
                        f"{self.stale_after:.0f}s, or remove it if no run uses the folder")
                holder, reason = {}, f"its lock file is unreadable and {age:.0f}s old"
            else:
                reason = self._why_dead(holder)
                if reason is None:
                    self._remove_created_folder()
                    raise FolderLockedError(self._held_message(holder))
            whose = describe_holder(holder) if holder else "an unknown run"
            self.say(f"taking over the lock on {self.folder} from {whose}: {reason}")
            self._take_over(holder)
        raise FolderLockedError(f"could not take the lock on {self.folder}: other processes keep taking it "
                                f"({self.path})")

    def _held_message(self, holder: dict[str, Any]) -> str:
        age = max(0.0, time.time() - float(holder.get("heartbeat") or 0))
        return (f"{self.folder} is in use by {describe_holder(holder)} (last heartbeat {age:.0f}s ago); "
                "wait for it to finish or stop it first. A dead run's lock is taken over once its "
                f"heartbeat is older than {self.stale_after:.0f}s (at once on the same machine), or "
                f"remove {self.path} if you are sure no run uses the folder")

    def _why_dead(self, holder: dict[str, Any]) -> str | None:
        """Why ``holder`` no longer holds the lock, or None while it does."""
        try:
            age = max(0.0, time.time() - float(holder.get("heartbeat")))
        except (TypeError, ValueError):
            age = float("inf")
        same_machine = (holder.get("machine") == machine_id() and holder.get("host") == socket.gethostname())
        pid = holder.get("pid")
        if same_machine and isinstance(pid, int):
            state = _process_state(pid)
            start = _process_start(pid)
            recycled = start is not None and holder.get("pid_start") not in (None, start)
            if state == "gone" or (state == "alive" and recycled):
                return f"its process {pid} is no longer running on this machine"
            if state == "alive":
                return None  # alive here: never taken from under it, even with a late heartbeat
        if age > self.stale_after:
            return f"its last heartbeat is {age:.0f}s old (more than {self.stale_after:.0f}s)"
        return None

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Remove the lock file if it is still ``holder``'s, serialised with other takers."""
        marker = self.path.with_name(LOCK_NAME + TAKEOVER_SUFFIX)
        if not _create_exclusive(marker, self._encode(self._record)):
            age = _age_of_file(marker)
            if age is not None and age > _TAKEOVER_STALE_SECONDS:
                marker.unlink(missing_ok=True)  # left by a taker that died in the middle
            return
        try:
            current = self.read()
            if current is None and holder == {}:
                self.path.unlink(missing_ok=True)
            elif current is not None and current.get("token") == holder.get("token"):
                self.path.unlink(missing_ok=True)
        finally:
            marker.unlink(missing_ok=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours; a folder the lock created
        and the run left empty (it failed before writing anything) goes too."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat + 5)
        current = self.read()
        if current is not None and current.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False
        self._remove_created_folder()

    def _remove_created_folder(self) -> None:
        if self._created_folder:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- the heartbeat ------------------------------------------------------------------------

    @staticmethod
    def _encode(record: dict[str, Any]) -> bytes:
        return (json.dumps(record, indent=1) + "\n").encode("utf-8")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock heartbeat {self.folder}", daemon=True)
        self._thread.start()

    def beat(self) -> bool:
        """Rewrite the lock's heartbeat now; False (and ``lost`` set) when another process holds it or
        the file is gone. A file caught half-written (not JSON yet) is left for the next beat: losing the
        lock stops the run."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        else:
            try:
                current = json.loads(text)
            except ValueError:
                return True
            current = current if isinstance(current, dict) else {}
        if current is None or current.get("token") != self.token:
            if not self.lost:
                self.lost = True
                holder = describe_holder(current) if current else "nobody (the lock file is gone)"
                logger.error("the lock on %s is no longer this run's: it is held by %s. Two runs may now "
                             "write the folder; stop one of them", self.folder, holder)
                if self.on_lost is not None:
                    self.on_lost(f"it is held by {holder}")
            return False
        self._record["heartbeat"] = time.time()
        tmp = self.path.with_name(f".{LOCK_NAME}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(self._encode(self._record))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                if not self.beat():
                    return
            except OSError as exc:  # a filesystem hiccup: the next beat tries again
                logger.debug("lock heartbeat on %s failed: %s", self.folder, exc)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], **kwargs: Any):
    """``with folder_lock(path, what=...):`` holds :class:`FolderLock` for the block."""
    lock = FolderLock(folder, **kwargs)
    with lock:
        yield lock


__all__ = ["HEARTBEAT_SECONDS", "LOCK_NAME", "STALE_AFTER_SECONDS", "FolderLock", "FolderLockedError",
           "describe_holder", "folder_lock", "is_lock_file"]
