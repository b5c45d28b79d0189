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


class _HiddenValueSwitch(argparse.BooleanOptionalAction):
    """``--X`` / ``--no-X``, writing ``on`` or ``off`` (rather than True/False) into the dest."""

    def __init__(self, option_strings: list[str], dest: str, *, on: Any, off: Any, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.on, self.off = on, off

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string in self.option_strings:
            setattr(namespace, self.dest, self.off if option_string.startswith("--no-") else self.on)


def add_hidden_switch_alias(group: Any, old: str, current: argparse.Action, *, on: Any, off: Any) -> None:
    """Accept the old switch pair ``old`` / ``--no-<old>`` (e.g. ``--bf16-autocast``) as spellings of the
    value ``on`` / ``off`` of the option ``current`` (e.g. ``--precision auto`` / ``fp32``), hidden
    from --help. A --config file may still set the old key to true or false."""
    for value in (on, off):
        if current.choices is not None and value not in current.choices:
            raise ValueError(f"alias {old}: {value!r} is not a choice of {current.option_strings[0]}")
    group.add_argument(old, action=_HiddenValueSwitch, dest=current.dest, on=on, off=off,
                       help=argparse.SUPPRESS, default=argparse.SUPPRESS)
