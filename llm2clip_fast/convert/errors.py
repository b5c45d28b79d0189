"""The expected failures of ``python -m llm2clip_fast.convert`` (each has its own exit code)."""

from __future__ import annotations


class SourceMismatchError(ValueError):
    """The source checkpoint is not what the chosen ``--from`` format expects: unknown or missing keys,
    wrong shapes, or a config that does not describe its tensors (exit 5)."""


class OutputExistsError(FileExistsError):
    """``--out`` already exists and ``--overwrite`` was not given (exit 4)."""
