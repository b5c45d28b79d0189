"""``python -m llm2clip_fast.train embed``: encode every caption with the frozen LLM into the cache.

Reads ``(key, captions)`` from a caption source without decoding images, encodes each shard's
captions with :class:`~llm2clip_fast.models.llm_encoder.LLMTextEncoder` (length-sorted batches cut by
a token budget, no per-batch wait on the GPU) and writes :mod:`llm2clip_fast.data.embedding_cache`.
The LLM's numerics: ``--precision`` (autocast: bf16 by default on CUDA and on CPUs with native bf16)
and ``--quantize`` (``llm-int8``, bitsandbytes, also spelt ``--load-in-8bit``; ``w8a8-int8`` /
``w8a8-fp8``, 8-bit weights and per-token activations, the 16-bit layers chosen by measured fidelity:
:mod:`llm2clip_fast.models.llm_quantization`). Both are recorded in the manifest's metadata (what
``eval`` re-encodes captions with) and in the encoder fingerprint: a cache encoded with other numerics
is re-encoded, with a message saying what changed. Rerunning the same
command after a kill resumes: finished shards are skipped. Rerunning it after the captions changed, or
after the LLM's (or LoRA's) weight files changed at the same path, re-encodes exactly the shards whose
inputs changed and says which. Records with an empty caption are skipped, counted as bad data
(``--max-bad-fraction``, checked at the end of the pass) and listed in the manifest, so stage 2 can
tell them from keys missing by mistake. Under ``torchrun`` shard ``i`` is encoded by rank
``i % world_size`` and rank 0 writes the manifest; on several nodes ``--out`` must be a shared
filesystem, checked at start (:mod:`~llm2clip_fast.train.shared_folder`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..data.bad_data import DEFAULT_MAX_FRACTION, BadDataTracker
from ..data.embedding_cache import MANIFEST_NAME, build_embedding_cache, storage_dtype_name
from ..models.llm_encoder import PRECISION_CHOICES, resolve_precision
from ..models.llm_quantization import QUANTIZE_CHOICES
from ..models.prompt_templates import TEMPLATE_CHOICES
from ..redaction import redact
from ..writable_output import check_writable
from . import distributed_failures
from .cli.device_flags import add_device_argument
from .run_spine import (
    add_distributed_arguments,
    distributed_run,
    hold_folder,
    options_config,
    resolve_device,
    write_run_config,
)
from .shared_folder import check_shared_folder

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", default=None,
                        help="model folder (or hub name present in the local HF cache); with "
                             "--import-llm2clip, the LLM the imported vectors came from (recorded for eval)")
    parser.add_argument("--data", default=None,
                        help="caption source: manifest (.csv/.tsv/.jsonl) or shard spec")
    parser.add_argument("--import-llm2clip", nargs="?", const="beside", default=None, metavar="DIR",
                        help="import LLM2CLIP's precomputed *_text_embeddings.tar files (one per --data "
                             "shard, in DIR or, without DIR, beside each shard) instead of running an LLM; "
                             "the cache's caption hashes come from the --data shards")
    parser.add_argument("--trust-embedding-keys", action="store_true",
                        help="with --import-llm2clip and no --data: import the tars' keys and vectors "
                             "without the captions they came from (recorded in the cache; stage 2 then warns "
                             "that it cannot check the cache against its data)")
    parser.add_argument("--out", required=True, help="cache folder (created; an unfinished one is resumed)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                        help="8-bit inference of the LLM: llm-int8 (bitsandbytes' LLM.int8 weights), "
                             "w8a8-int8 / w8a8-fp8 (8-bit weights and per-token activations; fp8 on GPUs of "
                             "compute capability 8.9+; the layers left in 16-bit are chosen by measured "
                             "embedding fidelity and recorded in the cache)")
    parser.add_argument("--load-in-8bit", action="store_true",
                        help="the same as --quantize llm-int8 (load the LLM's linear weights as LLM.int8)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="autocast of the LLM's forward (not the weights' dtype): auto (bf16 on CUDA and "
                             "on CPUs with native bf16, AVX512-BF16 or AMX; else none), bf16, or fp32 (none)")
    parser.add_argument("--dtype", choices=["fp16", "fp32", "int8"], default="fp16",
                        help="the dtype the embeddings are stored in (not the LLM's: that is "
                             "--model-dtype); int8: one byte per value plus a float32 scale per embedding "
                             "(about half of fp16), read back as float32 by stage 2")
    parser.add_argument("--model-dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="the LLM's weight dtype (stage1 calls it --dtype; the forward's autocast is "
                             "--precision) (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="captions per forward pass of the LLM, on each rank (an encode batch: it "
                             "changes speed and memory, not the embeddings); at most: the token budget below "
                             "cuts batches of long captions smaller")
    parser.add_argument("--max-batch-tokens", type=int, default=16384,
                        help="at most this many padded tokens per forward pass (captions x the batch's "
                             "longest one, after sorting by length): long captions go in small batches")
    parser.add_argument("--shard-size", type=int, default=10_000, help="records per cache shard")
    parser.add_argument("--captions", default=None, help="comma-separated caption names (default: all)")
    parser.add_argument("--instruction", default=None, help="prefix attended but not pooled")
    parser.add_argument("--template", default=None, choices=TEMPLATE_CHOICES,
                        help="prompt template as llm2vec 0.2.3 wraps texts (default: saved with the LLM, "
                             "else auto: detected from the tokenizer and config)")
    parser.add_argument("--lora", default=None,
                        help="peft adapter folder(s) merged into the LLM in order, comma-separated "
                             "(stage-1 output; LLM2Vec's MNTP,supervised pair)")
    parser.add_argument("--pooling", choices=["mean", "last_token"], default=None)
    parser.add_argument("--max-length", type=int, default=None, help="token limit (default 512 or saved)")
    parser.add_argument("--doc-max-length", type=int, default=None,
                        help="llm2vec's caption length cap in tokens, longer captions cut by words (default "
                             "saved with the LLM, else 400, llm2vec's; LLM2CLIP encodes with 512)")
    parser.add_argument("--normalize", action="store_true", help="store L2-normalised embeddings")
    add_device_argument(parser)
    add_distributed_arguments(parser)
    parser.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_FRACTION,
                        help="stop when more than this fraction of records has an empty caption "
                        "(default 1%%)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    from .cli.recipes import EMBED_RECIPES, mark_recipe_defaults

    mark_recipe_defaults(parser, EMBED_RECIPES)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value}")
    return value


def embed(
    *,
    llm: str,
    data: str,
    out: str | Path,
    load_in_8bit: bool = False,
    quantize: str = "none",
    precision: str = "auto",
    dtype: str = "fp16",
    model_dtype: str | None = None,
    batch_size: int = 256,
    max_batch_tokens: int | None = 16384,
    shard_size: int = 10_000,
    captions: list[str] | None = None,
    instruction: str | None = None,
    lora: str | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    normalize: bool = False,
    device: str | None = None,
    template: str | None = None,
    progress: bool = True,
    hook: Callable[[str, int], None] | None = None,
    max_bad_fraction: float = DEFAULT_MAX_FRACTION,
    config: dict[str, Any] | None = None,
    doc_max_length: int | None = None,
) -> Path | None:
    """Build (or resume) the embedding cache; returns the manifest path on rank 0, else ``None``.

    Rank 0 then writes the resolved settings as ``config.json`` into ``out`` (``config``: further
    entries, e.g. the command line's options; the resolved values win). The cache folder is locked
    while it is written (:mod:`~.folder_lock`): a second embed run on it stops with an error naming
    this one."""
    _positive("batch-size", batch_size)
    _positive("shard-size", shard_size)
    if max_batch_tokens is not None:
        _positive("max-batch-tokens", max_batch_tokens)
    if load_in_8bit and quantize not in ("none", "llm-int8"):
        raise ValueError(f"--load-in-8bit is --quantize llm-int8; it conflicts with --quantize {quantize}")
    quantize = "llm-int8" if load_in_8bit else quantize
    storage = storage_dtype_name(dtype)
    check_writable(out, flag="--out", folder=True)
    # Rank 0 locks the cache folder before any rank writes into it: two embed runs on one cache would
    # write the same shards and manifest.
    with hold_folder(out, main=distributed.get_rank() == 0, what="an embed run", say=logger.warning):
        return _embed_locked(
            llm=llm, data=data, out=out, quantize=quantize, precision=precision, storage=storage,
            model_dtype=model_dtype, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
            shard_size=shard_size, captions=captions, instruction=instruction,
            lora=lora, pooling=pooling, max_length=max_length, normalize=normalize, device=device,
            template=template, progress=progress, hook=hook, max_bad_fraction=max_bad_fraction,
            config=config, doc_max_length=doc_max_length)


def _embed_locked(*, llm: str, data: str, out: str | Path, quantize: str, precision: str, storage: str,
                  model_dtype: str | None, batch_size: int, max_batch_tokens: int | None, shard_size: int,
                  captions: list[str] | None,
                  instruction: str | None, lora: str | None, pooling: str | None, max_length: int | None,
                  normalize: bool, device: str | None, template: str | None, progress: bool,
                  hook: Callable[[str, int], None] | None, max_bad_fraction: float,
                  config: dict[str, Any] | None, doc_max_length: int | None = None) -> Path | None:
    """:func:`embed`'s work, with the cache folder locked."""
    from ..data.sources import open_source
    from ..models.llm_encoder import LLMTextEncoder

    # Before the LLM loads: ranks on several nodes must write into one folder that rank 0 can merge.
    distributed_failures.at("start-up: checking that every rank sees the cache folder (broadcast, "
                            "all-gather, barriers)")
    check_shared_folder(out)
    dev = resolve_device(device)
    compute = model_dtype or ("bf16" if dev.type == "cuda" else "fp32")
    autocast = "bf16" if resolve_precision(precision, dev) is not None else "fp32"
    source = open_source(data, require_images=False)  # captions only: text-only manifests are fine
    names = _caption_names(source, captions)
    encoder = LLMTextEncoder.from_pretrained(
        llm, dtype=compute, quantize=quantize, precision=autocast, instruction=instruction, lora=lora,
        merge_lora=lora is not None, pooling=pooling, max_length=max_length, normalize=normalize, device=dev,
        template=template, doc_max_length=doc_max_length,
    )
    rank, world = distributed.get_rank(), distributed.get_world_size()
    metadata = cache_metadata(encoder, llm=llm, lora=lora, load_in_8bit=quantize == "llm-int8",
                              compute=compute, data=data)
    options = encoder_options(encoder)
    fingerprint = encoder_fingerprint(metadata, llm=llm, lora=lora, options=options)
    _say_what_changed(Path(out), fingerprint)
    reporter = _ShardReporter(rank, progress, hook)
    bad = BadDataTracker(max_bad_fraction)
    distributed_failures.at("encoding this rank's shards, then the barrier until every rank has written "
                            "its own")
    manifest = build_embedding_cache(
        _caption_records(source, names, bad),
        lambda texts: encoder.encode(texts, batch_size=batch_size, show_progress=False,
                                     max_batch_tokens=max_batch_tokens),
        out, caption_names=names, dim=encoder.embedding_dim, dtype=storage, shard_size=shard_size,
        metadata=metadata, rank=rank, world_size=world, barrier=distributed.barrier, hook=reporter,
        fingerprint=fingerprint, skipped=bad.bad_keys, encoder_options=options,
    )
    if manifest is None:
        return None
    resolved = embed_settings(metadata, llm=llm, data=data, out=out, dtype=storage, batch_size=batch_size,
                              shard_size=shard_size, captions=names, lora=lora, device=dev,
                              max_bad_fraction=max_bad_fraction, world_size=world)
    resolved.update(options, max_batch_tokens=max_batch_tokens)
    write_run_config(Path(out), {**(config or {}), **resolved})
    if bad.bad:
        logger.warning("[embed] skipped %d record(s) with an empty or missing caption (not in the cache; "
                       "stage 2 counts them as bad data): %s", bad.bad, bad.summary())
    if progress:
        reporter.log_totals(manifest)
    return manifest


def _caption_names(source: Any, captions: list[str] | None) -> list[str]:
    """The captions to encode: ``captions``, checked against the source's, or all of the source's."""
    names = list(captions) if captions else list(source.caption_names)
    unknown = [n for n in names if n not in source.caption_names]
    if unknown:
        raise ValueError(f"--captions {unknown} not in the source; it has {source.caption_names}")
    return names


def cache_metadata(encoder: Any, *, llm: str, lora: str | None, load_in_8bit: bool, compute: str,
                   data: str) -> dict[str, Any]:
    """What the cache records about how its vectors were made: the LLM and LoRA folders (resolved), the
    encoder's resolved settings, the data source."""
    return {
        "model": str(Path(llm).resolve()) if Path(llm).exists() else llm,
        "lora": ",".join(str(Path(a.strip()).resolve()) for a in lora.split(",") if a.strip()) or None
        if lora else None,
        "load_in_8bit": bool(load_in_8bit), "model_dtype": compute, "pooling": encoder.pooling,
        "instruction": encoder.instruction, "max_length": encoder.max_length, "normalize": encoder.normalize,
        "bidirectional": encoder.bidirectional, "source": redact(str(data)),
        # The resolved prompt template and llm2vec's caption cap change every vector: part of the cache's
        # identity, and what eval re-encodes captions with.
        "template": encoder.template, "doc_max_length": encoder.doc_max_length,
    }


def encoder_options(encoder: Any) -> dict[str, Any]:
    """The encoder's numerics as the manifest records them (keys ``LLMTextEncoder.from_pretrained``
    takes, so ``eval`` loads the LLM the same way): ``precision`` ("bf16" or "fp32"), ``quantize``, and
    for w8a8 ``quantize_keep`` (the layers left in 16-bit) and ``quantization`` (the full report)."""
    options: dict[str, Any] = {"precision": "bf16" if encoder.autocast is not None else "fp32",
                               "quantize": encoder.quantize}
    if encoder.quantization is not None:
        report = encoder.quantization.as_dict()
        options["quantize_keep"] = list(report["kept_16bit"])
        options["quantization"] = report
    return options


def encoder_fingerprint(metadata: dict[str, Any], *, llm: str, lora: str | None,
                        options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What makes the embeddings: the encoding settings and the weight files' contents, so a model
    replaced at the same path re-encodes every shard instead of reusing stale vectors.

    ``options`` (:func:`encoder_options`): bf16 autocast adds ``precision``, w8a8 adds ``quantization``
    (mode, smoothing, calibration hash, layers kept in 16-bit); the defaults of earlier versions (fp32,
    no w8a8) add nothing, so their caches keep their fingerprint."""
    from ..models.llm_fingerprint import llm_weights_fingerprint

    encoding = ("load_in_8bit", "model_dtype", "pooling", "instruction", "max_length", "normalize",
                "bidirectional", "template", "doc_max_length")
    settings = {k: metadata[k] for k in encoding}
    options = options or {}
    if options.get("precision") == "bf16":
        settings["precision"] = "bf16"
    if options.get("quantization") is not None:
        report = options["quantization"]
        settings["quantization"] = {k: report[k] for k in ("mode", "smoothing_alpha", "calibration_sha256",
                                                          "kept_16bit")}
    # A LoRA chain ("A,B") is one folder per adapter, each part of what makes the vectors. The same
    # hashes go with the stage-2 model, and eval checks its LLM against them.
    return {"weights": llm_weights_fingerprint(llm, lora), "settings": settings}


def _say_what_changed(out: Path, fingerprint: dict[str, Any]) -> None:
    """Log which encoder settings differ from those a finished cache in ``out`` was encoded with (its
    shards are then re-encoded, each with its own message)."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        old = (json.loads(path.read_text()).get("encoder_fingerprint") or {}).get("settings") or {}
    except (OSError, ValueError):
        return
    new = fingerprint["settings"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        what = ", ".join(f"{k}: {old.get(k, '(default)')} -> {new.get(k, '(default)')}" for k in changed)
        logger.info("[embed] %s was encoded with other encoder settings (%s); its shards are re-encoded",
                    out, what)


def _caption_records(source: Any, names: list[str],
                     bad: BadDataTracker) -> Iterator[tuple[str, dict[str, str]]]:
    """``(key, {name: caption})`` of every record in order; empty captions go to ``bad`` (with the
    samples truncated shards lost), whose fraction is enforced before the manifest is written."""
    yield from ((key, {n: caps[n] for n in names}) for key, caps in source.iter_captions(bad_data=bad))
    # After the pass: a local source finds its damaged shards while indexing them on the way.
    for path, n in getattr(source, "lost_samples", {}).items():
        bad.add_lost(n, f"{n} sample(s) lost in the truncated shard {path}")
    # Before the manifest: a cache built from too much bad data must not look finished.
    bad.check_end_of_epoch()


class _ShardReporter:
    """The cache builder's hook: logs each shard written, reused or re-encoded, counts them, and
    passes every event on to the caller's ``hook``."""

    def __init__(self, rank: int, progress: bool, hook: Callable[[str, int], None] | None) -> None:
        self.rank, self.progress, self.hook = rank, progress, hook
        self.started = time.perf_counter()
        self.counts = {"written": 0, "skipped": 0}
        self.changed: dict[str, list[int]] = {"captions changed": [], "encoder changed": []}

    def __call__(self, event: str, shard: int) -> None:
        if event in self.counts:
            self.counts[event] += 1
            if self.progress:
                logger.info("[embed rank %d] shard %d %s (%.1fs)", self.rank, shard, event,
                            time.perf_counter() - self.started)
        if event in self.changed:
            self.changed[event].append(shard)
            logger.info("[embed rank %d] shard %d: %s changed since it was encoded; re-encoding it",
                        self.rank, shard, event.split()[0])
        if self.hook is not None:
            self.hook(event, shard)

    def log_totals(self, manifest: Path) -> None:
        """The closing line: shards written (and which were re-encoded for changed inputs), reused."""
        redone = sorted(self.changed["captions changed"] + self.changed["encoder changed"])
        detail = (f" ({len(redone)} re-encoded because their inputs changed: shards {redone})"
                  if redone else "")
        logger.info("[embed] %d shard(s) written%s, %d reused; manifest %s", self.counts["written"], detail,
                    self.counts["skipped"], manifest)


def embed_settings(metadata: dict[str, Any], *, llm: str, data: str, out: str | Path, dtype: str,
                   batch_size: int, shard_size: int, captions: list[str], lora: str | None,
                   device: torch.device, max_bad_fraction: float, world_size: int) -> dict[str, Any]:
    """``config.json`` of an embed run: the options as resolved (the encoder's own pooling, length,
    instruction and template, the compute dtype, the captions encoded, the device, the ranks)."""
    return {"llm": str(llm), "data": redact(str(data)), "out": str(out), "lora": lora, "dtype": dtype,
            "model_dtype": metadata["model_dtype"], "load_in_8bit": metadata["load_in_8bit"],
            "pooling": metadata["pooling"], "instruction": metadata["instruction"],
            "max_length": metadata["max_length"], "normalize": metadata["normalize"],
            "template": metadata["template"], "doc_max_length": metadata["doc_max_length"],
            "captions": list(captions), "batch_size": batch_size,
            "shard_size": shard_size, "device": str(device), "max_bad_fraction": max_bad_fraction,
            "world_size": world_size}


def run(args: argparse.Namespace) -> int:
    """``python -m llm2clip_fast.train embed``: the cache of ``--data``'s captions in ``--out``."""
    from .cli.recipes import EMBED_RECIPES, resolve_recipe

    resolve_recipe(args, EMBED_RECIPES)
    if args.doc_max_length is not None:
        _positive("doc-max-length", args.doc_max_length)
    if args.import_llm2clip is not None:
        return _run_import(args)
    if args.trust_embedding_keys:
        raise ValueError("--trust-embedding-keys goes with --import-llm2clip")
    missing = [f"--{n}" for n in ("llm", "data") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"embed needs {' and '.join(missing)} (or --import-llm2clip DIR to import "
                         "LLM2CLIP's precomputed embeddings)")
    with distributed_run(args.device, timeout_s=args.dist_timeout) as place:
        embed(
            llm=args.llm, data=args.data, out=args.out, load_in_8bit=args.load_in_8bit,
            quantize=args.quantize, precision=args.precision, dtype=args.dtype, model_dtype=args.model_dtype,
            batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, shard_size=args.shard_size,
            captions=[c.strip() for c in args.captions.split(",") if c.strip()] if args.captions else None,
            instruction=args.instruction, lora=args.lora, pooling=args.pooling, max_length=args.max_length,
            normalize=args.normalize, device=str(place.device), template=args.template,
            progress=not args.quiet, max_bad_fraction=args.max_bad_fraction, config=options_config(args),
            doc_max_length=args.doc_max_length,
        )
    return 0


def _run_import(args: argparse.Namespace) -> int:
    """``--import-llm2clip``: LLM2CLIP's embedding tars into the cache (:mod:`.import_llm2clip`)."""
    from .import_llm2clip import import_llm2clip_embeddings

    official = {"max_length": (None, 512), "doc_max_length": (None, 512),
                "template": (None, "llm2clip", "llama3")}
    names = ("lora", "instruction", "pooling", "model_dtype", "captions", "max_length", "doc_max_length",
             "template")
    conflicting = [f"--{n.replace('_', '-')}" for n in names
                   if getattr(args, n, None) not in official.get(n, (None,))]
    conflicting += [f"--{n.replace('_', '-')}" for n in ("load_in_8bit", "normalize") if getattr(args, n)]
    if conflicting:
        raise ValueError(f"--import-llm2clip imports vectors LLM2CLIP's extraction made already; "
                         f"{', '.join(conflicting)} cannot apply to them")
    if distributed.get_world_size() > 1:
        raise ValueError("--import-llm2clip runs in one process (no torchrun): it reads files, no LLM")
    with hold_folder(args.out, main=True, what="an embed run", say=logger.warning):
        manifest = import_llm2clip_embeddings(
            out=args.out, data=args.data, folder=args.import_llm2clip, trust_keys=args.trust_embedding_keys,
            llm=args.llm, dtype=args.dtype, shard_size=_positive("shard-size", args.shard_size),
            max_bad_fraction=args.max_bad_fraction, progress=not args.quiet)
        write_run_config(Path(args.out), {**options_config(args), "imported": str(manifest)})
    return 0
