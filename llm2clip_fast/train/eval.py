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
with each benchmark's own protocol: see ``llm2clip_fast.train.eval_suites``.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llm2clip_fast import atomic_files
from llm2clip_fast.models.llm_quantization import QUANTIZE_CHOICES
from llm2clip_fast.models.prompt_templates import TEMPLATE_CHOICES
from llm2clip_fast.redaction import redact
from llm2clip_fast.train.device_flags import add_device_argument
from llm2clip_fast.train.flag_aliases import add_hidden_alias
from llm2clip_fast.train.retrieval_metrics import (
    caption_retrieval_accuracy,
    image_text_retrieval,
    zero_shot_accuracy,
)
from llm2clip_fast.train.run_spine import resolve_device
from llm2clip_fast.writable_output import OutputNotWritableError, check_writable

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
ZERO_SHOT_TEMPLATE = "a photo of a {label}."


def _log(message: str) -> None:
    logger.info("[eval] %s", message)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return atomic_files.write_json_atomic(path, obj, sort_keys=True)


def load_text_encoder(model: Any, llm: str | os.PathLike[str] | None = None,
                      template: str | None = None, device: str | torch.device | None = None,
                      quantize: str | None = None, *, allow_llm_change: bool = False) -> Any:
    """The frozen ``LLMTextEncoder`` an llm-adapter model reads captions through; None for a model
    with its own (clip) text tower.

    The path and encoder options (pooling, max length, instruction, compute dtype, ...) come from the
    model's config (``config.llm``: the embedding cache's settings, which stage 2 records, with the LLM
    folder under ``model`` or ``path``); ``llm`` overrides the path and ``template`` the recorded
    prompt template; ``device`` where the LLM runs (default: its loader's). The recorded precision and
    8-bit quantisation (``precision``, ``quantize``, ``quantize_keep``) are reproduced unless ``quantize``
    overrides the mode (``"none"``, ``"llm-int8"``, ``"w8a8-int8"``, ``"w8a8-fp8"``).

    Before loading, the LLM's files are checked against the fingerprint the model recorded
    (:func:`~llm2clip_fast.models.llm_fingerprint.check_llm_unchanged`): an LLM retrained in place
    raises :class:`~llm2clip_fast.models.llm_fingerprint.LLMChangedError` unless ``allow_llm_change``.
    """
    if model.config.text_tower != "llm-adapter":
        return None
    recorded = dict(model.config.llm or {})
    fingerprint_record = dict(recorded)
    recorded_path = recorded.pop("path", None) or recorded.pop("model", None)
    path = llm if llm is not None else recorded_path
    if not path:
        raise ValueError("the model's config records no LLM (config.llm.model / config.llm.path); pass --llm "
                         "PATH, the LLM its embedding cache was computed with")
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder
    from llm2clip_fast.models.llm_fingerprint import check_llm_unchanged

    check_llm_unchanged(fingerprint_record, path, lora=recorded.get("lora"), allow_change=allow_llm_change)

    if "model_dtype" in recorded and "dtype" not in recorded:
        recorded["dtype"] = recorded.pop("model_dtype")
    accepted = inspect.signature(LLMTextEncoder.from_pretrained).parameters
    options = {k: v for k, v in recorded.items() if k in accepted and k != "path" and v is not None}
    if template is not None:
        options["template"] = template
    if quantize is not None:
        if options.get("quantize", "llm-int8" if options.get("load_in_8bit") else "none") != quantize:
            # Another mode than the cache's: its 16-bit layer list does not apply.
            options.pop("quantize_keep", None)
        options["quantize"] = quantize
        options.pop("load_in_8bit", None)
    if device is not None:
        options["device"] = device
    encoder = LLMTextEncoder.from_pretrained(str(path), **options)
    if hasattr(encoder, "eval"):
        encoder.eval()
    return encoder


def collect_eval_set(source: Any, preprocessing: Any) -> dict[str, Any]:
    """Decode and preprocess every good record of ``source`` with the tower's evaluation transform
    (``preprocessing``: the model's :class:`~llm2clip_fast.models.image_preprocessing.ImagePreprocessing`,
    or an image size for CLIP's).

    Returns ``{"keys": [...], "pixel_values": (N, 3, S, S) fp32, "captions": {name: [...]},
    "labels": [str | None, ...], "bad": tracker summary dict}``. Bad samples are skipped and
    counted by the source's bad-data tracker (which stops past its threshold).
    """
    from llm2clip_fast.data.image_transforms import clip_image_transform, image_transform_for

    if isinstance(preprocessing, int):
        transform = clip_image_transform(preprocessing, train=False)
    else:
        transform = image_transform_for(preprocessing, train=False)
    keys, pixels, labels = [], [], []
    captions: dict[str, list[str]] = {name: [] for name in source.caption_names}
    for record in source.iter_records():
        keys.append(record.key)
        pixels.append(transform(record.image))
        labels.append(record.label)
        for name in captions:
            captions[name].append(record.captions[name])
    if not keys:
        raise ValueError(f"no usable records in {source.describe()}: {source.bad_data.summary()}")
    return {"keys": keys, "pixel_values": torch.stack(pixels), "captions": captions, "labels": labels,
            "bad": source.bad_data.as_dict()}


@torch.no_grad()
def embed_images(model: Any, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, 3, S, S) -> (N, embed_dim) L2-normalised fp32 image features, in batches."""
    device = next(model.parameters()).device
    out = [model.encode_image(pixel_values[i:i + batch_size].to(device), normalize=True).float().cpu()
           for i in range(0, pixel_values.shape[0], batch_size)]
    return torch.cat(out)


def evaluate(model: Any, eval_set: dict[str, Any], *, encoder: Any = None, caption: str = "long",
             cra_captions: tuple[str, str] | None = ("short", "long"), batch_size: int = 64,
             ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """All metrics of ``model`` on a collected eval set (see :func:`collect_eval_set`).

    ``caption`` names the caption retrieval uses; ``cra_captions`` the (query, target) caption names
    for CRA (skipped when either is missing, or None). ``encoder`` is the LLM for llm-adapter models.
    Returns a flat dict: ``n``, ``caption``, ``i2t_R@K``/``t2i_R@K``, ``cra`` (or None),
    ``zero_shot`` (or None), ``n_classes``, ``seconds``.
    """
    names = eval_set["captions"]
    if caption not in names:
        raise ValueError(f"caption {caption!r} is not in the data; captions found: {sorted(names)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    start = time.perf_counter()
    model.eval()
    n = len(eval_set["keys"])

    def embed_texts(texts: list[str]) -> torch.Tensor:
        return model.encode_captions(texts, encoder, batch_size=batch_size, normalize=True).float().cpu()

    images = embed_images(model, eval_set["pixel_values"], batch_size)
    texts = {caption: embed_texts(names[caption])}
    results: dict[str, Any] = {"n": n, "caption": caption, "chance_R@1": 1.0 / n}
    results.update(image_text_retrieval(images, texts[caption], ks))

    results["cra"] = None
    if cra_captions is not None and all(c in names for c in cra_captions):
        for name in cra_captions:
            if name not in texts:
                texts[name] = embed_texts(names[name])
        results["cra"] = caption_retrieval_accuracy(texts[cra_captions[0]], texts[cra_captions[1]])

    results["zero_shot"], results["n_classes"] = None, 0
    labelled = [i for i, label in enumerate(eval_set["labels"]) if label is not None]
    if labelled:
        classes = sorted({eval_set["labels"][i] for i in labelled})
        class_emb = model.class_prompt_embeddings(classes, encoder, templates=(ZERO_SHOT_TEMPLATE,),
                                                  batch_size=batch_size).float().cpu()
        index = {c: j for j, c in enumerate(classes)}
        targets = torch.tensor([index[eval_set["labels"][i]] for i in labelled])
        results["zero_shot"] = zero_shot_accuracy(images[labelled], class_emb, targets)
        results["n_classes"] = len(classes)
        results["n_labelled"] = len(labelled)
    results["seconds"] = time.perf_counter() - start
    return results


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}"


def format_results_table(rows: dict[str, dict[str, Any]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """A text table, one row per named result dict (as :func:`evaluate` returns), percentages."""
    cols = [f"i2t R@{k}" for k in ks] + [f"t2i R@{k}" for k in ks] + ["CRA", "zero-shot", "n"]
    keys = [f"i2t_R@{k}" for k in ks] + [f"t2i_R@{k}" for k in ks] + ["cra", "zero_shot"]
    name_w = max(12, *(len(name) for name in rows))
    widths = [max(7, len(c)) for c in cols]
    lines = ["  ".join([" " * name_w, *(c.rjust(w) for c, w in zip(cols, widths))])]
    for name, r in rows.items():
        cells = [_pct(r.get(k)) for k in keys] + [str(r.get("n", "-"))]
        lines.append("  ".join([name.ljust(name_w), *(c.rjust(w) for c, w in zip(cells, widths))]))
    return "\n".join(lines)


def evaluate_model_dir(model_dir: str | os.PathLike[str], data: str, *, llm: str | None = None,
                       caption: str = "long", batch_size: int = 64, encoder: Any = None,
                       ks: Sequence[int] = DEFAULT_KS, image_root_only: bool = False,
                       template: str | None = None, device: str | torch.device | None = None,
                       quantize: str | None = None, allow_llm_change: bool = False,
                       encoding_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a saved model and a caption source and evaluate (the ``eval`` sub-command's work).

    ``encoder`` reuses an already loaded LLM (the pipeline evaluates two splits with one load).
    ``image_root_only``: manifest image paths outside the manifest's folder are bad samples.
    ``device``: where the model and the LLM run (None: the model on the CPU, the LLM where its loader
    puts it). ``quantize``: the LLM's 8-bit mode instead of the one its cache recorded.
    ``allow_llm_change``: evaluate even when the LLM's files differ from those the model recorded (see
    :func:`load_text_encoder`). ``encoding_overrides``: encoding settings (``max_length``,
    ``doc_max_length``) that replace those the model recorded (``--max-length``, ``--doc-max-length``,
    ``--recipe llm2clip``).
    """
    from llm2clip_fast.data.sources import open_source
    from llm2clip_fast.models.llm2clip import LLM2CLIPModel

    model = LLM2CLIPModel.from_pretrained(model_dir, device=device if device is not None else "cpu")
    if encoding_overrides:
        model.config.llm = {**(model.config.llm or {}), **encoding_overrides}
    source = open_source(data, image_root_only=image_root_only)
    from llm2clip_fast.data.caption_names import resolve_caption_name

    caption = resolve_caption_name(caption, source.caption_names)  # 'long' finds the official longSV_captions
    if caption not in source.caption_names:
        raise ValueError(f"--caption {caption!r} is not a caption of {data}; captions found: "
                         f"{source.caption_names}")
    if encoder is None:
        encoder = load_text_encoder(model, llm, template=template, device=device, quantize=quantize,
                                    allow_llm_change=allow_llm_change)
    recorded = model.config.llm or {}
    text_path = (f"LLM {llm or recorded.get('model') or recorded.get('path')}" if encoder is not None
                 else "clip text tower")
    _log(f"{source.describe()}: embedding images and {caption!r} captions ({text_path})")
    eval_set = collect_eval_set(source, model.preprocessing)
    results = evaluate(model, eval_set, encoder=encoder, caption=caption, batch_size=batch_size, ks=ks)
    results.update({"model": str(model_dir), "data": redact(str(data)), "text_tower": model.config.text_tower,
                    "bad_samples": eval_set["bad"]})
    return results


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
    from .recipes import EVAL_RECIPES, mark_recipe_defaults

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
    ``llm2clip_fast.train.eval_suites``)."""
    from llm2clip_fast.train.eval_suites import ModelEmbedder, format_suite_table, run_suites

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
    from .recipes import EVAL_RECIPES, resolve_recipe

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
