"""The error every layer raises when an optional package a feature needs is not installed (or cannot be
imported), so that the command lines can turn it into one exit code (9) wherever it comes from."""

from __future__ import annotations


class MissingDependencyError(ImportError):
    """A package the asked-for feature needs is missing or unusable; the message names it and the
    install line."""
