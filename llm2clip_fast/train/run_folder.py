"""Run folders that never lose work: what a trainer does with ``--out`` before it writes anything.

- A folder holding anything (a finished or interrupted run) is an error unless ``--resume``
  (continue it) or ``--overwrite`` (delete it and start over; every removed entry is reported).
- Temporaries a killed save left behind (``.tmp-*``, ``.old-*``, ``.*.tmp``, in the folder and its
  ``checkpoints/``) are removed at start, and reported.
- A run id ties checkpoints to the run that wrote them, so pruning never touches another run's.
- The folder's lock file (:mod:`.folder_lock`: another run must not use the folder while this one does)
  is neither a run's content nor deleted by ``--overwrite``.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from ..atomic_files import is_leftover_temporary
from ..writable_output import is_write_probe
from .checkpoint import CHECKPOINTS_DIRNAME
from .folder_lock import is_lock_file

_SHOWN = 12


class RunFolderError(RuntimeError):
    """``--out`` already holds a run and neither ``--resume`` nor ``--overwrite`` was given."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def _describe(entries: list[Path]) -> str:
    names = [f"{p.name}/" if p.is_dir() else p.name for p in sorted(entries)]
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def clean_leftover_temporaries(out: Path, say: Callable[[str], None]) -> list[Path]:
    """Remove what killed atomic writes left in ``out`` and ``out/checkpoints``; returns the paths."""
    removed = []
    for folder in (out, out / CHECKPOINTS_DIRNAME):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if is_leftover_temporary(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        say(f"removed {len(removed)} leftover temporary item(s) of an interrupted save: "
            + ", ".join(str(p) for p in removed))
    return removed


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Read-only check every rank can run: raise unless ``out`` may be used as asked."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: give one, not both")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    if resume or overwrite or not out.is_dir():
        return
    # Another rank's write probe (writable_output) may stand in the folder for an instant: not a run.
    entries = [p for p in out.iterdir()
               if not (is_leftover_temporary(p.name) or is_lock_file(p.name) or is_write_probe(p.name))]
    if entries:
        raise RunFolderError(f"--out {out} already holds a run ({_describe(entries)}); pass --resume to "
                             "continue it, --overwrite to delete it and start over, or choose another --out")


def prepare_run_folder(out: Path, *, resume: bool, overwrite: bool, say: Callable[[str], None]) -> None:
    """Make ``out`` ready (call on one process, after :func:`check_run_folder` passed everywhere):
    create it, remove leftover temporaries, and with ``overwrite`` delete what is there, saying what."""
    check_run_folder(out, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    clean_leftover_temporaries(out, say)
    if overwrite:
        entries = sorted(p for p in out.iterdir() if not (is_lock_file(p.name) or is_write_probe(p.name)))
        if entries:
            say(f"--overwrite: removing {_describe(entries)} from {out}")
            for p in entries:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
