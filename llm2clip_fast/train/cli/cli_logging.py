"""Status messages of the command lines through :mod:`logging`.

The trainers, ``embed``, ``eval`` and the pipeline log to loggers under ``llm2clip_fast`` instead of
printing. :func:`setup_cli_logging` (called by ``python -m llm2clip_fast.train``) sends them to stderr
as plain lines, from rank 0 only under ``torchrun`` (other ranks keep warnings and errors, prefixed with
their rank). Library users who configure :mod:`logging` themselves get the same records and are left
alone: the handler is added to the ``llm2clip_fast`` logger once, only by the command line. Results
(tables, the paths written) stay on stdout as the command's output. Every line the handler writes has
its credentials masked (:func:`~llm2clip_fast.redaction.redact`), whatever logged it.
"""

from __future__ import annotations

import logging
import os
import sys

from ...redaction import redact

ROOT_LOGGER = "llm2clip_fast"
_HANDLER_NAME = "llm2clip_fast.cli"


def process_rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _RankFilter(logging.Filter):
    """Rank 0 logs everything; other ranks only warnings and errors, with their rank in front."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank()
        if rank == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        record.msg = f"[rank {rank}] {record.msg}"
        return True


class _RedactingFormatter(logging.Formatter):
    """The message (and any traceback) with credentials masked: a shard URL, a ``pipe:`` command."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a broken pipe must not stop training
            self.handleError(record)


def setup_cli_logging(level: int = logging.INFO) -> logging.Logger:
    """Attach the command line's stderr handler to the ``llm2clip_fast`` logger (idempotent)."""
    logger = logging.getLogger(ROOT_LOGGER)
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(_RedactingFormatter("%(message)s"))
        handler.addFilter(_RankFilter())
        logger.addHandler(handler)
        # Records still propagate: a root handler the user (or pytest's caplog) set up sees them too.
    logger.setLevel(level)
    return logger
