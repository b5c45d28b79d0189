"""``python -m llm2clip_fast.train``: the LLM2CLIP stages as sub-commands.

- ``stage1``: caption-contrastive LoRA fine-tuning of the LLM;
- ``embed``: encode every caption with the frozen LLM into the embedding cache;
- ``stage2``: train the vision tower + text adapter on cached embeddings;
- ``eval``: retrieval / CRA / zero-shot evaluation of a stage-2 model.

With no sub-command, runs the whole pipeline on the built-in demo set (``pipeline``).
Each sub-command lives in ``llm2clip_fast.train.<name>`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their sub-command is used.

Expected failures print one line ``llm2clip_fast.train CMD: error: ...`` on stderr and exit with:

  2  bad arguments or options (also argparse's own usage errors)
  3  a file or folder that does not exist, or that cannot be read or written (permissions, a
     read-only filesystem; eval checks its --out before computing anything)
  4  --out already holds a run (pass --resume or --overwrite), or another run is using the folder
     (--out, or embed's cache; the message names it, --overwrite and --resume included), or took
     over this run's lock while it ran (it stops after the current step, writing nothing more)
  5  a damaged checkpoint or model file (a truncated model.safetensors), or --resume with no usable
     checkpoint
  6  a damaged embedding cache, or one built from other captions than the data's, or (eval) an LLM
     whose files differ from those recorded with the model (--allow-llm-change to go on)
  7  too much bad data (more than --max-bad-fraction of the samples)
  8  a loss, gradient or weight became inf/nan (nothing of that step is saved)
  9  a package the trainer needs is not installed (pip install 'llm2clip_fast[train]')
  10 a distributed run failed: a rank was lost, or a collective (or the start-up rendezvous) waited
     longer than --dist-timeout; every waiting rank names the collective and the ranks to blame
  130 interrupted (Ctrl-C): stops at once; --resume continues from the last checkpoint
  143 stopped by SIGTERM (how SLURM and Kubernetes pre-empt): every rank stops after the same step
     and a checkpoint is saved there (--resume continues exactly); outside the training steps the
     run stops at once

Anything else is a bug and shows its traceback (exit 1). ``--debug`` (anywhere on the command line) or
``LLM2CLIP_DEBUG=1`` shows the traceback of expected failures too. :func:`main` raises instead of
exiting, for use from Python; :func:`cli` is the command line.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys

from ..cli_exit_codes import code_for, redacting_excepthook, run_command_line
from ..missing_dependency import MissingDependencyError
from .cli.cli_logging import setup_cli_logging
from .cli.config_file import add_config_argument, expand_config_argument
from .cli.dependencies import require_train_packages

SUBCOMMANDS = {
    "pipeline": "run every stage on the built-in demo set (the default)",
    "stage1": "caption-contrastive LoRA fine-tuning of the LLM",
    "embed": "encode captions with the frozen LLM into the embedding cache",
    "stage2": "train vision tower + text adapter on cached LLM embeddings",
    "eval": "retrieval, CRA and zero-shot evaluation of a trained model",
}


def _has_default_to_show(action: argparse.Action) -> bool:
    """An option with a value of its own when not given (not a switch that is off, not "unset")."""
    # Identity, not ``in``: 0 and 0.0 equal False, yet they are defaults worth showing.
    unset = (None, False, argparse.SUPPRESS)
    return bool(action.option_strings) and not any(action.default is v for v in unset)


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless its help already says it or there is none."""

    def _format_action(self, action: argparse.Action) -> str:
        # argparse prints no help line at all for an option without help text: give it one.
        if action.help is None and _has_default_to_show(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not _has_default_to_show(action):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def add_subcommand_options(parser: argparse.ArgumentParser, name: str) -> None:
    """The options of sub-command ``name`` (its module's ``add_arguments``) and ``--config FILE``."""
    importlib.import_module(f"llm2clip_fast.train.{name}").add_arguments(parser)
    add_config_argument(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line of :func:`main`, ``--config FILE`` expanded (``args.config``: its path)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in {"-h", "--help"}):
        argv = ["pipeline", *argv]
    parser = argparse.ArgumentParser(prog="python -m llm2clip_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    if wanted is not None:
        # Before the sub-command's module is imported: a missing package is one clear line, not a
        # traceback from deep inside the data or model modules.
        require_train_packages(f"python -m llm2clip_fast.train {wanted}")
    config_path = None
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_DefaultsHelpFormatter)
        if name == wanted:
            add_subcommand_options(p, name)
            rest, config_path = expand_config_argument(argv[1:], p)
            argv = [name, *rest]
    args = parser.parse_args(argv)
    if args.command is not None:
        args.config = config_path
    return args


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging()
    args = parse_args(argv)
    if args.command is None:
        print(f"usage: python -m llm2clip_fast.train COMMAND ...; commands: {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    from .stop_requests import handling_sigterm

    with handling_sigterm():  # SIGTERM: stop after the current step, saved (exit 143)
        return int(importlib.import_module(f"llm2clip_fast.train.{args.command}").run(args) or 0)


def exit_code_for(exc: BaseException) -> int | None:
    """The documented exit code of an expected failure (see the module docstring), None for a bug."""
    # Answered before the imports below, which need the very packages that may be missing.
    if isinstance(exc, MissingDependencyError):
        return 9
    if isinstance(exc, KeyboardInterrupt):
        return 130
    from ..data.bad_data import BadDataError
    from ..data.embedding_cache import CacheCorruptError, StaleCacheError
    from ..models.llm_fingerprint import LLMChangedError
    from ..safetensors_files import DamagedWeightsError
    from ..writable_output import OutputNotWritableError
    from .checkpoint import CheckpointError
    from .distributed_failures import DistributedFailure
    from .folder_lock import FolderLockedError
    from .run_folder import RunFolderError
    from .stop_requests import SIGTERM_EXIT_CODE, RunPreempted

    return code_for(exc, [
        (RunPreempted, SIGTERM_EXIT_CODE),
        (DistributedFailure, 10),
        ((RunFolderError, FolderLockedError), 4),
        ((CheckpointError, DamagedWeightsError), 5),
        ((CacheCorruptError, StaleCacheError, LLMChangedError), 6),
        (BadDataError, 7),
        (FloatingPointError, 8),
        ((FileNotFoundError, NotADirectoryError, PermissionError, OutputNotWritableError), 3),
        (ValueError, 2),
    ])


def cli(argv: list[str] | None = None) -> int:
    """The command line: :func:`main`, with expected failures turned into one message and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a != "--debug"), None)
    command = command if command in SUBCOMMANDS else "pipeline"
    return run_command_line(main, argv, f"llm2clip_fast.train {command}", exit_code_for)


if __name__ == "__main__":
    sys.excepthook = redacting_excepthook  # a bug's traceback must not print a credential either
    sys.exit(cli())
