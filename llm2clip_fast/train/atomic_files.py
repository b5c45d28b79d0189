"""Atomic file and folder writes: a reader (or a resumed run) sees the old content or the new, never a
torn file, even if the process is killed mid-write.

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
from pathlib import Path
from typing import Any

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


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = False) -> None:
    """JSON (indent 2, non-JSON values via ``str``) written with :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


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
