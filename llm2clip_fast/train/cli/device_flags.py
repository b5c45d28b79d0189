"""``--device`` and ``--precision``: one spelling, meaning and help text in every sub-command.

``stage1``, ``embed``, ``stage2`` and ``eval`` take ``--device``, resolved by
:func:`llm2clip_fast.distributed.resolve_device`; ``stage1`` and ``stage2`` take ``--precision``, the
autocast of their forward passes (:func:`~.run_spine.autocast_factory`). Flags that sound alike but
set something else say so in their help: ``stage1 --dtype`` and ``embed --model-dtype`` are the LLM's
weight dtype, ``embed --dtype`` the dtype the embeddings are stored in.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..run_spine import PRECISIONS

DEVICE_HELP = ("where the run executes: auto (this rank's GPU when CUDA is available, else the CPU), cpu, "
               "cuda (this rank's GPU under torchrun) or cuda:N")
PRECISION_HELP = ("autocast of the forward passes (not the weights' dtype): auto (bf16 on CUDA, none on the "
                  "CPU), bf16 (on any device) or fp32 (none)")


def add_device_argument(group: Any, *, note: str = "") -> argparse.Action:
    """``--device`` (default auto) on ``group``; ``note`` is appended to the shared help text."""
    return group.add_argument("--device", default="auto", help=DEVICE_HELP + (f"; {note}" if note else ""))


def add_precision_argument(group: Any, *, note: str = "") -> argparse.Action:
    """``--precision {auto,fp32,bf16}`` (default auto) on ``group``; ``note`` is appended to the help."""
    return group.add_argument("--precision", choices=PRECISIONS, default="auto",
                              help=PRECISION_HELP + (f"; {note}" if note else ""))


__all__ = ["DEVICE_HELP", "PRECISION_HELP", "add_device_argument", "add_precision_argument"]
