"""``python -m llm2clip_fast.train eval``: retrieval, CRA and zero-shot evaluation of a trained model.

Every image of a held-out source is embedded by the model's vision tower; every caption is embedded
end to end the way the model reads text: through the frozen LLM (``LLMTextEncoder``, the one recorded
in the model's config unless ``--llm`` names another) and the trained adapter, or through the model's
own CLIP text tower for the baseline. Reported (fractions in [0, 1]):

- image->text and text->image recall@1/5/10 over the whole source, one caption (``--caption``) per
  image; ties count by their expectation under a random tie-break (see ``retrieval_metrics``);
- CRA, caption retrieval accuracy: each short caption retrieves its own long caption (top-1) among
  all long captions of the source, through the same text path (only when both captions exist);
- zero-shot accuracy where records carry a label: the class prompt "a photo of a {label}." of every
  distinct label is embedded and each image is classified by the nearest prompt.

Prints a table and writes the numbers to ``--out`` (JSON, written atomically).

``--suite NAME --root DIR`` instead evaluates on a published benchmark read from its downloaded layout
(Flickr30k, COCO, Urban-1k, DOCCI, ShareGPT4V-1k retrieval; ImageNet and class-per-folder zero-shot),
with each benchmark's own protocol: see ``llm2clip_fast.eval.suites``.

The evaluation itself lives in :mod:`llm2clip_fast.eval` (``held_out``, ``suites``); this module is its
command line.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from llm2clip_fast.distributed import resolve_device
from llm2clip_fast.eval.held_out import evaluate_model_dir, format_results_table
from llm2clip_fast.eval.results_files import write_json_atomic
from llm2clip_fast.models.llm_quantization import QUANTIZE_CHOICES
from llm2clip_fast.models.prompt_templates import TEMPLATE_CHOICES
from llm2clip_fast.train.cli.device_flags import add_device_argument
from llm2clip_fast.train.cli.flag_aliases import add_hidden_alias
from llm2clip_fast.writable_output import OutputNotWritableError, check_writable

logger = logging.getLogger(__name__)


def _log(message: str) -> None:
    logger.info("[eval] %s", message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a saved LLM2CLIPModel (stage 2 output)")
    parser.add_argument("--data", default=None,
                        help="held-out caption source (manifest or WebDataset shards); or use --suite")
    parser.add_argument("--suite", default=None,
                        help="a benchmark read from its downloaded layout under --root: flickr30k, coco, "
                             "urban1k, docci, sharegpt4v-1k, imagenet, classfolders, or all (every suite "
                             "found as a sub-folder of --root); see README 'Evaluation suites'")
    parser.add_argument("--root", default=None,
                        help="the suite's folder (or, with --suite all, their parent)")
    parser.add_argument("--classnames", default=None,
                        help="class-per-folder suites: class names (one a line in sorted folder order, "
                             "'folder<TAB>name' lines, or a JSON {folder: name})")
    parser.add_argument("--templates", default=None,
                        help="class-per-folder suites: prompt templates, one a line with '{}' for the class "
                             "name (default: the 80 OpenAI ImageNet templates)")
    parser.add_argument("--llm", default=None,
                        help="frozen LLM to embed captions with (default: the one in the model's config)")
    parser.add_argument("--allow-llm-change", action="store_true",
                        help="evaluate even when the LLM's files differ from those recorded with the model "
                             "(an LLM retrained in place after stage 2); without it that is an error "
                             "(exit 6)")
    parser.add_argument("--template", default=None,
                        choices=TEMPLATE_CHOICES,
                        help="prompt template to encode captions with (default: the one the embedding "
                             "cache recorded); must match what the adapter was trained on")
    parser.add_argument("--max-length", type=int, default=None,
                        help="the LLM's token limit for captions (default: what the model's embedding cache "
                             "recorded)")
    parser.add_argument("--doc-max-length", type=int, default=None,
                        help="llm2vec's caption length cap (default: what the model's embedding cache "
                             "recorded; LLM2CLIP encodes with 512)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                        help="8-bit inference of the LLM that embeds the captions (see embed --quantize); "
                             "default: what the model's embedding cache recorded")
    parser.add_argument("--load-in-8bit", dest="quantize", action="store_const", const="llm-int8",
                        help="the same as --quantize llm-int8")
    parser.add_argument("--caption", default="long", help="caption name used for retrieval (default: long)")
    parser.add_argument("--batch-size", type=int, default=64, help="images/captions per forward (default 64)")
    parser.add_argument("--out", default=None,
                        help="--data: write the results here as JSON (atomically). --suite: the results "
                             "folder (default MODEL/eval): SUITE.json, results.csv (appended), cache/")
    parser.add_argument("--image-root-only", action="store_true",
                        help="manifest image paths must stay inside the manifest's folder (others are bad "
                        "samples)")
    add_device_argument(parser, note="the model and the LLM that embeds the captions")
    # --workers / --no-progress: the spellings before the trainers' --num-workers / --quiet.
    add_hidden_alias(parser, "--workers", parser.add_argument(
        "--num-workers", dest="workers", type=int, default=4,
        help="--suite: image decoding processes (default 4)"))
    parser.add_argument("--no-cache", action="store_true",
                        help="--suite: neither read nor write the per-model embedding cache")
    parser.add_argument("--max-missing-fraction", type=float, default=0.01,
                        help="--suite: stop when more of a suite's images than this are missing or "
                             "undecodable (default 0.01); fewer are left out and reported")
    add_hidden_alias(parser, "--no-progress", parser.add_argument(
        "--quiet", dest="no_progress", action="store_true", help="--suite: no progress bars"))
    from .cli.recipes import EVAL_RECIPES, mark_recipe_defaults

    mark_recipe_defaults(parser, EVAL_RECIPES)


def encoding_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--max-length`` / ``--doc-max-length`` (given, or from ``--recipe``), checked."""
    out = {}
    for name in ("max_length", "doc_max_length"):
        value = getattr(args, name, None)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
            out[name] = value
    return out


def run_suites_command(args: argparse.Namespace, device: torch.device) -> int:
    """``eval --suite`` on ``device``: the benchmarks under ``--root`` (see
    ``llm2clip_fast.eval.suites``)."""
    from llm2clip_fast.eval.suites import ModelEmbedder, format_suite_table, run_suites

    if not args.root:
        raise ValueError("--suite needs --root DIR (the suite's folder, or with --suite all their parent)")
    if args.workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.workers}")

    out = Path(args.out) if args.out else Path(args.model) / "eval"
    check_writable(out, flag="--out" if args.out else "the results folder (default MODEL/eval; --out)",
                   folder=True)  # before hours of embedding, not after
    embedder = ModelEmbedder(args.model, llm=args.llm, template=args.template, device=device,
                             quantize=getattr(args, "quantize", None), allow_llm_change=args.allow_llm_change,
                             encoding_overrides=encoding_overrides(args))
    _log(f"model {args.model} on {device}; text path: {embedder.text_path}")
    results = run_suites(embedder, args.suite, args.root, out=out, model_name=str(args.model),
                         classnames=args.classnames, templates=args.templates, batch_size=args.batch_size,
                         workers=args.workers, cache=not args.no_cache,
                         max_missing_fraction=args.max_missing_fraction, progress=not args.no_progress)
    print(format_suite_table(results))
    print(f"wrote {', '.join(str(out / (r['suite'] + '.json')) for r in results)}; appended to "
          f"{out / 'results.csv'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m llm2clip_fast.train eval``."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # Resolved before anything loads: --device cuda without CUDA is a one-line error, as in the trainers.
    device = resolve_device(args.device)
    from .cli.recipes import EVAL_RECIPES, resolve_recipe

    resolve_recipe(args, EVAL_RECIPES)
    encoding_overrides(args)  # checked before anything loads
    from llm2clip_fast.convert.input_norm_notice import warn_if_input_norm_assumed

    warn_if_input_norm_assumed(args.model)  # a converted release whose adapter input norm was assumed
    if getattr(args, "suite", None) is not None:
        if args.data is not None:
            raise ValueError("pass either --data (a caption source) or --suite (a benchmark), not both")
        return run_suites_command(args, device)
    if args.data is None:
        raise ValueError("eval needs --data SOURCE or --suite NAME --root DIR")
    if args.out:  # before the model loads and everything is embedded, not after
        if Path(args.out).is_dir():
            raise OutputNotWritableError(f"--out {args.out!r} is a folder; --data writes one JSON file: give "
                                         "its path")
        check_writable(args.out, flag="--out", folder=False)
    _log(f"model {args.model} on {device}")
    results = evaluate_model_dir(args.model, args.data, llm=args.llm, caption=args.caption,
                                 batch_size=args.batch_size, image_root_only=args.image_root_only,
                                 template=getattr(args, "template", None), device=device,
                                 quantize=getattr(args, "quantize", None),
                                 allow_llm_change=getattr(args, "allow_llm_change", False),
                                 encoding_overrides=encoding_overrides(args))
    print(format_results_table({Path(args.model).name or str(args.model): results}))
    print(f"chance R@1 = {100 * results['chance_R@1']:.1f}% over {results['n']} images; "
          f"{results['seconds']:.1f}s")
    if args.out:
        print(f"wrote {write_json_atomic(args.out, results)}")
    return 0
