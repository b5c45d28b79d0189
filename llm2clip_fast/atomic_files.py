"""Atomic file and folder writes: a reader (or a resumed run) sees the old content or the new, never a
torn file, even if the process is killed mid-write. Every file the library writes (checkpoints, models,
caches, logs, demo data, eval results) goes through here.

Every temporary name starts with a dot and contains ``.tmp`` (``.NAME.<id>.tmp`` for files,
``.tmp-NAME-<id>`` for folders, ``.old-NAME-<id>`` for a folder being swapped out), so
:func:`is_leftover_temporary` recognises what a killed write left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_LEFTOVER = re.compile(r"^\.(tmp-.+|old-.+|.+\.tmp)$")


def is_leftover_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file/folder name used by this module (or the checkpoint writer)."""
    return bool(_LEFTOVER.match(name))


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk where the filesystem allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_stream_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` once complete (fsynced, renamed)."""

    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return write_path_atomic(path, write_file)


def write_path_atomic(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` (for writers that take a file name, e.g. safetensors' ``save_file``),
    then fsync and rename the finished file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_stream_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = False) -> Path:
    """JSON (indent 2, non-JSON values via ``str``) written with :func:`write_text_atomic`."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place atomically (the old one, if any, is swapped out first)."""
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
