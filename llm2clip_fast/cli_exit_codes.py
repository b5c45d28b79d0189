"""The command lines' shared failure handling: expected failures print one line and exit with a
documented code, anything else is a bug and keeps its traceback.

``--debug`` (anywhere on the command line) or ``LLM2CLIP_DEBUG=1`` shows the traceback of expected
failures too. Used by ``python -m llm2clip_fast.train`` and ``python -m llm2clip_fast.convert``, each
with its own table of exception types and codes. Whatever is printed, the one line or a traceback
(:func:`redacting_excepthook`), has its credentials masked (:mod:`llm2clip_fast.redaction`).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from types import TracebackType

from .redaction import redact

ExitCodes = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], int]]


def code_for(exc: BaseException, table: ExitCodes) -> int | None:
    """The first code in ``table`` whose exception type(s) ``exc`` is an instance of; None for a bug."""
    for kinds, code in table:
        if isinstance(exc, kinds):
            return code
    return None


def run_command_line(main: Callable[[list[str]], int], argv: list[str] | None, program: str,
                     exit_code_for: Callable[[BaseException], int | None]) -> int:
    """``main(argv)`` with expected failures turned into ``program: error: ...`` and their code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LLM2CLIP_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except BaseException as exc:  # expected failures become exit codes below; the rest re-raises
        code = exit_code_for(exc)
        if code is None or debug or isinstance(exc, SystemExit):
            raise
        print(redact(f"{program}: error: {str(exc) or type(exc).__name__}"), file=sys.stderr)
        if code not in (130, 143):  # an interruption, not a failure to debug
            print("(run with --debug or LLM2CLIP_DEBUG=1 for the traceback)", file=sys.stderr)
        return code


def redacting_excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` of the command lines: the traceback as Python prints it, credentials masked
    (an exception's message may quote a shard URL or a ``pipe:`` command)."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))
    sys.stderr.flush()
