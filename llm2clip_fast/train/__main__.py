"""``python -m llm2clip_fast.train``: the LLM2CLIP stages as sub-commands.

- ``stage1``: caption-contrastive LoRA fine-tuning of the LLM;
- ``embed``: encode every caption with the frozen LLM into the embedding cache;
- ``stage2``: train the vision tower + text adapter on cached embeddings;
- ``eval``: retrieval / CRA / zero-shot evaluation of a stage-2 model.

With no sub-command, runs the whole pipeline on the built-in demo set (``pipeline``).
Each sub-command lives in ``llm2clip_fast.train.<name>`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their sub-command is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "pipeline": "run every stage on the built-in demo set (the default)",
    "stage1": "caption-contrastive LoRA fine-tuning of the LLM",
    "embed": "encode captions with the frozen LLM into the embedding cache",
    "stage2": "train vision tower + text adapter on cached LLM embeddings",
    "eval": "retrieval, CRA and zero-shot evaluation of a trained model",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in {"-h", "--help"}):
        argv = ["pipeline", *argv]
    parser = argparse.ArgumentParser(prog="python -m llm2clip_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            importlib.import_module(f"llm2clip_fast.train.{name}").add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(f"llm2clip_fast.train.{args.command}").run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
