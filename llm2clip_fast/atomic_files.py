"""Atomic file and folder writes: a reader (or a resumed run) sees the old content or the new, never a
torn file, even if the process is killed mid-write. Every file the library writes (checkpoints, models,
caches, logs, demo data, eval results) goes through here.

Every file written here gets the permissions an ordinary ``open()`` gives under the process's umask
(``0666 & ~umask``), whatever the writer did: safetensors creates its files ``0600``, so without this a
checkpoint's weights and its ``meta.json`` would differ in who may read them. Folders assembled under a
temporary name by another library (``save_pretrained``) get the same treatment when moved into place
with :func:`replace_dir`.

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


def _read_umask() -> int:
    """The process's umask: from ``/proc/self/status`` where Linux reports it (no race with threads
    creating files), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0666 & ~umask``: the mode ``open(path, "w")`` gives a new file in this process."""
    return 0o666 & ~_read_umask()


def apply_default_mode(path: str | os.PathLike[str]) -> None:
    """Give the regular file ``path`` (or every regular file under the folder ``path``) the mode of
    :func:`default_file_mode`; symlinks are left alone."""
    path = Path(path)
    mode = default_file_mode()
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        if not file.is_symlink() and (file.stat().st_mode & 0o777) != mode:
            os.chmod(file, mode)


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
        apply_default_mode(tmp)  # safetensors writes 0600; every file we write follows the umask
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
    """Move a finished folder into place atomically (the old one, if any, is swapped out first); its
    files get the umask's mode first (:func:`apply_default_mode`)."""
    apply_default_mode(tmp)
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
