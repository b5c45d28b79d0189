"""``--recipe``: named sets of stage-1 defaults; every flag given on the command line still wins.

``llm2clip`` is LLM2CLIP's official stage-1 setting (the paper and its released training scripts,
which follow llm2vec's supervised recipe): LoRA r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down
(``--lora-targets auto`` on a decoder), lr 2e-4 with 300 warm-up steps, logit scale 50, 512 caption
pairs per step over all ranks.

How "given on the command line" is told apart from a default: :func:`mark_recipe_defaults` wraps the
parser defaults of the recipe's options in :class:`ParserDefault`; :func:`resolve_recipe` replaces
each still-wrapped value by the recipe's (or the plain default) and records where each came from.
"""

from __future__ import annotations

import argparse
from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "none": {},
    "llm2clip": {
        "lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "lora_targets": "auto",
        "lr": 2e-4, "warmup_steps": 300, "scale": 50.0, "batch_size": 512,
    },
}
RECIPE_KEYS = sorted({k for r in RECIPES.values() for k in r})


class ParserDefault:
    """A parser default not (yet) overridden by a flag."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def mark_recipe_defaults(parser: argparse.ArgumentParser) -> None:
    """Add ``--recipe`` and wrap the defaults of every option a recipe sets."""
    parser.add_argument("--recipe", default="none", choices=sorted(RECIPES),
                        help="named defaults: llm2clip = LLM2CLIP's stage-1 setting (LoRA r16/a32/d0.05 on "
                             "q/k/v/o/gate/up/down, lr 2e-4, 300 warm-up steps, scale 50, batch 512); "
                             "flags given explicitly override it")
    defaults = {k: parser.get_default(k) for k in RECIPE_KEYS}
    parser.set_defaults(**{k: ParserDefault(v) for k, v in defaults.items()})


def resolve_recipe(args: argparse.Namespace) -> dict[str, str]:
    """Fill the recipe's options in ``args`` (in place; idempotent). Returns ``{option: "flag" |
    "recipe" | "default"}`` for the recipe's options (empty when already resolved)."""
    recipe_name = getattr(args, "recipe", "none") or "none"
    if recipe_name not in RECIPES:
        raise ValueError(f"--recipe must be one of {sorted(RECIPES)}, got {recipe_name!r}")
    recipe = RECIPES[recipe_name]
    origin: dict[str, str] = {}
    for key in RECIPE_KEYS:
        value = getattr(args, key, None)
        if isinstance(value, ParserDefault):
            setattr(args, key, recipe.get(key, value.value))
            origin[key] = "recipe" if key in recipe else "default"
        else:
            origin[key] = "flag"
    if any(v != "flag" for v in origin.values()) or not hasattr(args, "recipe_origin"):
        args.recipe_origin = origin
    return origin
