"""Writing the converted model: the whole folder appears at once, or not at all.

The model is saved into a hidden temporary folder next to ``--out`` (``.tmp-NAME-<id>``, a name
:func:`~llm2clip_fast.atomic_files.is_leftover_temporary` recognises) and renamed into place.
An existing ``--out`` is replaced only with ``overwrite``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..atomic_files import fsync_dir, replace_dir, write_json_atomic
from ..models.llm2clip import LLM2CLIPModel
from ..writable_output import check_writable
from .errors import OutputExistsError

PROVENANCE_NAME = "conversion.json"


def check_output(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """``out`` as a Path, refusing an existing one unless ``overwrite``, and one whose folder cannot
    take the new folder (:func:`~llm2clip_fast.writable_output.check_writable`; called before any work)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--out {str(out)!r} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {str(out)!r} exists and is not a folder; refusing to replace a file")
    # Written as a temporary folder beside it, then renamed: its parent must take new entries.
    check_writable(out, flag="--out", folder=False)
    return out


def write_model_folder(model: LLM2CLIPModel, out: str | os.PathLike[str], provenance: dict[str, Any],
                       overwrite: bool = False) -> Path:
    """Save ``model`` (``config.json`` + ``model.safetensors``) and ``conversion.json`` to ``out``,
    atomically."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        write_json_atomic(tmp / PROVENANCE_NAME, provenance, sort_keys=True)
        fsync_dir(tmp)
        check_output(out, overwrite)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
