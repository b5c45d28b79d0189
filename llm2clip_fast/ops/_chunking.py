"""Row-chunk sizing shared by the loss backends (the C x N workspace of the chunked paths)."""

from __future__ import annotations

import os


def chunk_elements_from_env(name: str) -> int | None:
    """The workspace size in elements that environment variable ``name`` asks for, or None if unset.

    Raises ValueError naming the variable when it is set to anything but a positive integer.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value
