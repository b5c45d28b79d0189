"""``--recipe``: named sets of stage-1 defaults; every flag given on the command line still wins.

``llm2clip`` is LLM2CLIP's official stage-1 setting (the paper and its released training scripts,
which follow llm2vec's supervised recipe): LoRA r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down
(``--lora-targets auto`` on a decoder), lr 2e-4 with 300 warm-up steps, logit scale 50, 512 caption
pairs per step over all ranks.

How "given on the command line" is told apart from a default: :func:`mark_recipe_defaults` makes
the recipe's options record, on the parsed namespace, that they were given; their defaults stay plain
values, so code that reads ``args`` before :func:`resolve_recipe` sees ordinary numbers and strings.
:func:`resolve_recipe` then puts the recipe's value into every option that was not given and records
where each came from. A namespace built without the parser counts as "nothing given".
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


# Set on the parsed namespace: the dests of the recipe's options that were given as flags.
EXPLICIT_ATTR = "_recipe_explicit"


def _records_given(action_cls: type[argparse.Action]) -> type[argparse.Action]:
    """A subclass of ``action_cls`` that also notes its dest as given on the namespace."""

    class RecordsGiven(action_cls):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
            super().__call__(parser, namespace, values, option_string)
            given = set(getattr(namespace, EXPLICIT_ATTR, ()))
            given.add(self.dest)
            setattr(namespace, EXPLICIT_ATTR, given)

    RecordsGiven.__name__ = RecordsGiven.__qualname__ = f"RecordsGiven{action_cls.__name__}"
    return RecordsGiven


def mark_recipe_defaults(parser: argparse.ArgumentParser) -> None:
    """Add ``--recipe`` and make every option a recipe sets remember whether it was given."""
    parser.add_argument("--recipe", default="none", choices=sorted(RECIPES),
                        help="named defaults: llm2clip = LLM2CLIP's stage-1 setting (LoRA r16/a32/d0.05 on "
                             "q/k/v/o/gate/up/down, lr 2e-4, 300 warm-up steps, scale 50, batch 512); "
                             "flags given explicitly override it")
    found = set()
    # argparse offers no hook for "was this given": swap each action's class for a recording subclass
    # (same fields, one extra step in __call__), which keeps type conversion and help unchanged.
    for action in parser._actions:
        if action.dest in RECIPE_KEYS:
            action.__class__ = _records_given(type(action))
            found.add(action.dest)
    missing = sorted(set(RECIPE_KEYS) - found)
    if missing:
        raise ValueError(f"mark_recipe_defaults: the parser has no options for recipe keys {missing}")


def resolve_recipe(args: argparse.Namespace) -> dict[str, str]:
    """Fill the recipe's options in ``args`` (in place; idempotent). Returns ``{option: "flag" |
    "recipe" | "default"}`` for the recipe's options."""
    if getattr(args, "recipe_origin", None) is not None and getattr(args, "_recipe_resolved", False):
        return dict(args.recipe_origin)
    recipe_name = getattr(args, "recipe", "none") or "none"
    if recipe_name not in RECIPES:
        raise ValueError(f"--recipe must be one of {sorted(RECIPES)}, got {recipe_name!r}")
    recipe = RECIPES[recipe_name]
    given = set(getattr(args, EXPLICIT_ATTR, ()))
    origin: dict[str, str] = {}
    for key in RECIPE_KEYS:
        if key in given:
            origin[key] = "flag"
        elif key in recipe:
            setattr(args, key, recipe[key])
            origin[key] = "recipe"
        else:
            origin[key] = "default"
    args.recipe_origin = origin
    args._recipe_resolved = True
    return dict(origin)
