"""Reading safetensors weights with one clear error for a damaged file.

A ``model.safetensors`` cut short by an interrupted copy or download makes the ``safetensors`` package
raise ``SafetensorError: Error while deserializing header: incomplete metadata, file not fully
covered``, which names neither the file nor what to do. :func:`read_safetensors` and
:func:`open_safetensors` raise :class:`DamagedWeightsError` instead, naming the file, its size and the
likely cause.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DamagedWeightsError(ValueError):
    """A safetensors file cannot be read: truncated, damaged, or not safetensors at all."""


def _damaged(path: str | os.PathLike[str], exc: BaseException) -> DamagedWeightsError:
    try:
        size = f"{Path(path).stat().st_size} bytes"
    except OSError:
        size = "size unknown"
    reason = str(exc).strip() or type(exc).__name__
    cut = "incomplete" in reason or "too small" in reason or "not fully covered" in reason
    likely = ("it is truncated (an interrupted copy or download?)" if cut
              else "it is damaged or not safetensors")
    return DamagedWeightsError(f"{path} cannot be read as safetensors ({size}): {likely}: {reason}. Copy or "
                               "save it again")


def read_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """Every tensor of the safetensors file ``path`` (on ``device``); :class:`DamagedWeightsError` naming
    the file when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as exc:
        raise _damaged(path, exc) from None


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike[str]) -> Iterator[Any]:
    """``safetensors.safe_open(path, framework="pt")`` for the block (read single tensors lazily);
    :class:`DamagedWeightsError` naming the file when its header cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise _damaged(path, exc) from None
    with handle as f:
        yield f


__all__ = ["DamagedWeightsError", "open_safetensors", "read_safetensors"]
