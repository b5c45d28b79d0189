"""``--recipe``: named sets of defaults, one table per stage; every flag given explicitly still wins.

Stage 1's ``llm2clip`` is LLM2CLIP's official stage-1 objective, checked against microsoft/LLM2CLIP at
commit cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a: ``llm_caption_contrastive/run_supervised.py`` with
``train_configs/supervised/MetaLlama3_cc3m.json`` and ``dataset/E5_cc3m.py``:

- LoRA r=16, alpha=2r=32, dropout 0.05 on q/k/v/o/gate/up/down (``initialize_peft``; ``--lora-targets
  auto`` on a decoder); lr 2e-4, 300 warm-up steps, HF Trainer's default linear decay
  (``--schedule linear``), 64 per device x 8 = 512 pairs per step (``--batch-size 512``), one epoch,
  ``max_seq_length`` 512 with no caption cut (the training collator tokenises without llm2vec's
  ``doc_max_length`` step: ``--max-length 512 --doc-max-length 512``);
- ``HardNegativeNLLLoss`` (scale 50) in one direction (``--loss hardneg``), the hard negative of each
  pair being the caption of the positive's kind of a random *other* sample (``rand_index != i``:
  ``--hard-negative-other-image``);
- the query's direction drawn per pair and its instruction per direction, ``f"{instruction}; " +
  separator + text`` (``--query-instruction-short "Given a sentence, retrieve a detailed relevant
  sentence;"`` and ``--query-instruction-long "Given a detailed sentence, retrieve a short relevant
  sentence;"``: the encoder joins ``instruction.strip() + " "`` before the separator, which gives the same
  string), positives and negatives the separator alone (no instruction).

The starting point is not a value: ``--llm`` (Meta-Llama-3-8B-Instruct) with ``--lora`` (McGill's
``-mntp`` and ``-mntp-supervised`` adapters, then LLM2CLIP's own MNTP adapter), merged in that order.

Stage 2's ``llm2clip`` is the official stage-2 setting, checked against microsoft/LLM2CLIP at commit
cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a (2026-02-01): ``llm2clip/run.sh`` (last changed in 71839f1f)
trains EVA02-CLIP-L-14-336 with ``--lr=1e-5 --visual-lr=1e-5 --text-lr=1e-5 --wd=0.05 --visual-ld=0.85
--grad-clip-norm=5.0 --warmup 0 --batch-size=512`` on ``--nproc_per_node=8`` (512 per GPU: 4096 over
all ranks, one global-batch loss through ``--gather-with-grad --local-loss``), with the cosine
schedule of ``llm2clip/training/scheduler.py`` (``warmup_cosine_lr``); the output size is
``"embed_dim": 1280`` of ``llm2clip/eva_clip/model_configs/EVA02-CLIP-L-14-336.json``; and
``llm2clip/training/data.py`` (``get_text``) picks each sample's caption embedding with
``random.choice([shortsv, longsv])``, i.e. short and long 50/50 per sample. Here: ``--lr 1e-5 --llrd
0.85 --weight-decay 0.05 --max-grad-norm 5 --warmup-steps 0 --global-batch-size 4096 --embed-dim 1280
--caption short:0.5,long:0.5``. The visual projection is re-initialised there
(``load_checkpoint`` in ``llm2clip/eva_clip/factory.py`` deletes every ``visual.head`` weight of the
pretrained tower), which is stage 2's default (``--keep-projection`` off).

Optimizer: run.sh passes ``--optimizer="ap_adamw" --precision "fp16"``; ``create_optimizer``
(``llm2clip/training/optim.py``) takes ``AnyPrecisionAdamW`` only under bf16, so the run uses
``torch.optim.AdamW`` with ``betas=(args.beta1, args.beta2), eps=args.eps``, which ``parse_args``
(``llm2clip/training/params.py``) fills from ``get_default_params(args.model)``: 0.9/0.98/1e-6 when the
lower-cased model name contains "vit", 0.9/0.999/1e-8 otherwise. None of the 13 model configs the
repository ships (``llm2clip/eva_clip/model_configs``: EVA01/EVA02-CLIP-*, OpenaiCLIP-*, Llama3.x-*)
contains "vit", so every official run, on EVA02 and OpenAI towers alike, trains with beta1 0.9, beta2
0.999, eps 1e-8: ``--beta1 0.9 --beta2 0.999 --eps 1e-8`` here. run.sh's ``--text-ld=1.01`` is a no-op:
``get_assigner`` builds a layer-decay assigner only for a factor below 1.0, so the text adapter trains at
the plain lr, as it does here.

Run length: run.sh passes ``--epochs=20`` although its run name says ``4ep``
(``T_vitl336_Rcc12mR_Rcc3m_4ep``); the recipe follows the flag (``--epochs 20``; ``--steps`` replaces it).

How "given explicitly" is told apart from a default: :func:`mark_recipe_defaults` makes the options
a table tracks record, on the parsed namespace, that they were given (on the command line, or in a
``--config`` file, which expands into command-line words); their defaults stay plain values, so code
that reads ``args`` before :func:`resolve_recipe` sees ordinary numbers and strings.
:func:`resolve_recipe` then puts the recipe's value into every option that was not given and records
where each came from. A namespace built without the parser counts as "nothing given".
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from ...models.prompt_templates import LLM2CLIP_ENCODING


@dataclass(frozen=True)
class RecipeTable:
    """One stage's recipes.

    Attributes:
        stage: the sub-command the table belongs to (for messages).
        recipes: recipe name -> {option dest: value}; "none" (no values) is always there.
        help: the ``--recipe`` help text.
        yields_to: recipe option -> options whose explicit use means the recipe's value is not applied
            (stage 2: an explicit per-rank ``--batch-size`` replaces the recipe's ``--global-batch-size``).
    """

    stage: str
    recipes: dict[str, dict[str, Any]]
    help: str
    yields_to: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "none" not in self.recipes or self.recipes["none"]:
            raise ValueError(f"{self.stage} recipes: 'none' must be there and set nothing")

    @property
    def keys(self) -> list[str]:
        """Every option some recipe of the table sets."""
        return sorted({k for r in self.recipes.values() for k in r})

    @property
    def tracked(self) -> list[str]:
        """The options whose explicit use is recorded: the recipe options and what they yield to."""
        return sorted(set(self.keys) | {d for ds in self.yields_to.values() for d in ds})


STAGE1_RECIPES = RecipeTable(
    stage="stage1",
    recipes={
        "none": {},
        "llm2clip": {
            "lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "lora_targets": "auto",
            "lr": 2e-4, "warmup_steps": 300, "scale": 50.0, "batch_size": 512, "schedule": "linear",
            "loss": "hardneg", "hard_negative_other_image": True, "max_length": 512, "doc_max_length": 512,
            "query_instruction_short": "Given a sentence, retrieve a detailed relevant sentence;",
            "query_instruction_long": "Given a detailed sentence, retrieve a short relevant sentence;",
        },
    },
    help="named defaults: llm2clip = LLM2CLIP's stage-1 objective (llm_caption_contrastive: LoRA "
         "r16/a32/d0.05 on q/k/v/o/gate/up/down, lr 2e-4, 300 warm-up steps then linear, batch 512, "
         "HardNegativeNLLLoss at scale 50 with a random other image's caption as hard negative, "
         "per-direction query instructions, max length 512 with no caption cut); flags given explicitly "
         "override it",
)

STAGE2_RECIPES = RecipeTable(
    stage="stage2",
    recipes={
        "none": {},
        "llm2clip": {
            "lr": 1e-5, "llrd": 0.85, "wd": 0.05, "grad_clip": 5.0, "warmup": 0,
            "global_batch_size": 4096, "embed_dim": 1280, "caption": "short:0.5,long:0.5",
            "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "epochs": 20.0,
        },
    },
    help="named defaults: llm2clip = LLM2CLIP's official stage-2 setting (microsoft/LLM2CLIP run.sh: "
         "lr 1e-5, vision layer-wise lr decay 0.85, weight decay 0.05, max grad norm 5, no warmup, "
         "global batch 4096 over all ranks, embed dim 1280, captions short:0.5,long:0.5 per sample, "
         "AdamW betas 0.9/0.999 eps 1e-8, 20 epochs); flags given explicitly (command line or --config) "
         "override it, an explicit --batch-size replaces its global batch and --steps its epochs",
    yields_to={"global_batch_size": ("batch_size",), "epochs": ("steps",)},
)

ENCODING_HELP = ("named defaults: llm2clip = LLM2CLIP's caption encoding (llm2clip/data/"
                 "extract_embedding.py: max length 512, doc_max_length 512, the template LLM2CLIP's copy of "
                 "llm2vec chooses, with the Meta-Llama-3-8B-Instruct name its extraction forces on the "
                 "released LLM); flags given explicitly override it")
EMBED_RECIPES = RecipeTable(stage="embed", recipes={"none": {}, "llm2clip": dict(LLM2CLIP_ENCODING)},
                            help=ENCODING_HELP)
EVAL_RECIPES = RecipeTable(stage="eval", recipes={"none": {}, "llm2clip": dict(LLM2CLIP_ENCODING)},
                           help=ENCODING_HELP)

RECIPE_TABLES = {t.stage: t for t in (STAGE1_RECIPES, STAGE2_RECIPES, EMBED_RECIPES, EVAL_RECIPES)}

# Set on the parsed namespace: the dests of the tracked options that were given as flags.
EXPLICIT_ATTR = "_recipe_explicit"
# Set on the parsed namespace (a parser default): the stage of the table the parser was marked with.
TABLE_ATTR = "_recipe_table"


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


def mark_recipe_defaults(parser: argparse.ArgumentParser, table: RecipeTable = STAGE1_RECIPES) -> None:
    """Add ``--recipe`` (``table``'s names) and make every option the table tracks remember whether it
    was given."""
    parser.add_argument("--recipe", default="none", choices=sorted(table.recipes), help=table.help)
    parser.set_defaults(**{TABLE_ATTR: table.stage})
    found = set()
    # argparse offers no hook for "was this given": swap each action's class for a recording subclass
    # (same fields, one extra step in __call__), which keeps type conversion and help unchanged.
    for action in parser._actions:
        if action.dest in table.tracked:
            action.__class__ = _records_given(type(action))
            found.add(action.dest)
    missing = sorted(set(table.tracked) - found)
    if missing:
        raise ValueError(f"mark_recipe_defaults: the {table.stage} parser has no options for recipe keys "
                         f"{missing}")


def explicitly_given(args: argparse.Namespace) -> set[str]:
    """The dests of the tracked options given on the command line (or in a --config file)."""
    return set(getattr(args, EXPLICIT_ATTR, ()))


def resolve_recipe(args: argparse.Namespace, table: RecipeTable | None = None) -> dict[str, str]:
    """Fill the recipe's options in ``args`` (in place; idempotent). ``table``: the stage's table
    (default: the one the parser was marked with; stage 1's for a namespace built without the parser).

    Returns ``{option: "flag" | "recipe" | "default"}`` for the options the table tracks; also kept as
    ``args.recipe_origin``."""
    if getattr(args, "recipe_origin", None) is not None and getattr(args, "_recipe_resolved", False):
        return dict(args.recipe_origin)
    if table is None:
        table = RECIPE_TABLES[getattr(args, TABLE_ATTR, STAGE1_RECIPES.stage)]
    recipe_name = getattr(args, "recipe", "none") or "none"
    if recipe_name not in table.recipes:
        raise ValueError(f"--recipe must be one of {sorted(table.recipes)} for {table.stage}, "
                         f"got {recipe_name!r}")
    recipe = table.recipes[recipe_name]
    given = explicitly_given(args)
    origin: dict[str, str] = {}
    for key in table.tracked:
        if key in given:
            origin[key] = "flag"
        elif key in recipe and not given.intersection(table.yields_to.get(key, ())):
            setattr(args, key, recipe[key])
            origin[key] = "recipe"
        else:
            origin[key] = "default"
    args.recipe_origin = origin
    args._recipe_resolved = True
    return dict(origin)
