"""Old flag spellings kept working after a rename, without showing in ``--help``.

The sub-commands share one vocabulary (``--weight-decay``, ``--warmup-steps``, ``--max-grad-norm``,
``--quiet``); a spelling a released version accepted stays as a hidden alias that writes the same
destination, so existing scripts and config files keep running.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_hidden_alias(group: Any, old: str, current: argparse.Action) -> None:
    """Accept ``old`` (e.g. ``--wd``) as another spelling of the option ``current``, hidden from --help.

    ``group``: the parser or argument group ``current`` was added to (argparse needs the alias in the
    same mutually-exclusive group, if any, to be added there by the caller).
    """
    kwargs: dict[str, Any] = {"dest": current.dest, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
    if current.nargs == 0:  # a switch: same const
        kwargs["action"] = "store_const"
        kwargs["const"] = current.const
    else:
        kwargs["type"] = current.type
        kwargs["nargs"] = current.nargs
        if current.choices is not None:
            kwargs["choices"] = current.choices
    group.add_argument(old, **kwargs)
