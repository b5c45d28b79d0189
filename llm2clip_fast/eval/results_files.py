"""Evaluation result files: indented, key-sorted JSON, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import atomic_files


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return atomic_files.write_json_atomic(path, obj, sort_keys=True)
