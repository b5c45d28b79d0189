"""Whether an output path can be written, found out before any work is done.

``eval`` used to embed every image and caption and only then fail on ``--out`` with a
``PermissionError`` traceback. :func:`check_writable` probes the place first: it creates (and removes)
a temporary file in the output's folder, or in the nearest folder above it that exists, which tells a
read-only filesystem, missing permissions, a root-squashed NFS mount or a file standing where a folder
must be, whoever runs it (``os.access`` says yes to root on all of them). Nothing is created but
that one temporary file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputNotWritableError(PermissionError):
    """An output path cannot be written (the message names the option and why)."""


# Every rank of a distributed run probes its output folder at start-up, while rank 0 may be checking that
# the same folder holds no run: the run-folder checks skip these names (:func:`is_write_probe`).
WRITE_PROBE_PREFIX = ".llm2clip_fast-write-check-"


def is_write_probe(name: str) -> bool:
    """Whether ``name`` is the short-lived file :func:`check_writable` creates and removes."""
    return name.startswith(WRITE_PROBE_PREFIX)


def check_writable(path: str | os.PathLike[str], *, flag: str, folder: bool) -> Path:
    """``path`` as a Path, after checking that it can be written: a folder to create or write into
    (``folder``), else an entry to create or replace in its folder (a file, or a folder renamed into
    place: atomic writes put a temporary beside it). Raises :class:`OutputNotWritableError` naming
    ``flag`` otherwise."""
    path = Path(path)
    target = path if folder else path.parent
    probe_in = target
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OutputNotWritableError(f"{flag} {str(path)!r} cannot be written: {str(probe_in)!r} is a file, "
                                     "not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe_in, prefix=WRITE_PROBE_PREFIX)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise OutputNotWritableError(f"{flag} {str(path)!r} cannot be written: {why} in {str(probe_in)!r} "
                                     "(choose another place, or fix its permissions)") from None
    os.close(fd)
    Path(name).unlink(missing_ok=True)
    return path


__all__ = ["WRITE_PROBE_PREFIX", "OutputNotWritableError", "check_writable", "is_write_probe"]
