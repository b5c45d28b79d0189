"""Stage 2: train the vision tower + projection + text adapter on cached LLM caption embeddings.

``python -m llm2clip_fast.train stage2 --embeddings DIR --data SOURCE --out DIR [options]``

The LLM never runs here: each caption's embedding is read from the embedding cache written by the
``embed`` step. The text side is the :class:`TextAdapter` over those embeddings (or, with
``--text-tower clip``, the CLIP-style baseline text transformer on token ids, tokenised on the fly).

The step:

- contrastive loss over the *global* batch: the fused ``clip_loss`` (or ``siglip_loss``); under
  ``torchrun`` each rank passes its local features to the distributed mode of the loss, so the
  negatives span every rank and the gradients equal single-process training on the concatenated batch;
- ``--grad-accum K`` keeps that property across micro-batches (as OpenCLIP's accumulation does): the
  features of all K micro-batches are computed once without grad, then each micro-batch is recomputed
  with grad and its slice of the full K-batch loss back-propagated. The step therefore equals one
  step at K times the batch (negatives span all K micro-batches), at one extra forward per sample;
- AdamW (no decay on biases, norms and the logit scale/bias), layer-wise lr decay over the vision
  tower's depth (``--llrd``), linear warmup + cosine, gradient clipping, bf16 autocast on GPU;
- DDP under ``torchrun`` (``--fsdp``: FSDP2 sharding of each vision layer, for large towers).

``--recipe llm2clip`` sets LLM2CLIP's official stage-2 values (see :mod:`.recipes`); explicit flags win.
``--global-batch-size`` derives the per-rank ``--batch-size`` from the world size and ``--grad-accum``;
``--caption`` may be a weighted mix (:mod:`~llm2clip_fast.data.caption_mix`); ``--keep-projection``
keeps a pretrained CLIP folder's projection.

Run folder ``OUT``: ``log.jsonl`` (loss, lr, images/s, grad norm, logit scale), ``loss.png``,
``checkpoints/step_*`` (atomic, every ``--save-every`` steps and at the end; ``--resume`` continues
exactly), ``config.json`` (resolved options, ``settings_from``, ``caption_mix``), ``summary.json``
and the final model in ``OUT/model`` (:meth:`LLM2CLIPModel.save_pretrained`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.caption_mix import CaptionMix
from ..data.image_transforms import image_transform_for
from ..distributed import barrier, get_world_size, is_distributed
from ..models.attention_kernels import KERNELS as ATTENTION_KERNELS
from ..models.llm2clip import MAX_LOG_LOGIT_SCALE, LLM2CLIPConfig, LLM2CLIPModel
from ..models.vision import VISION_PRESETS, VisionTower, build_vision_tower
from ..redaction import redact_value
from . import distributed_failures
from .checkpoint import checkpoint_dir, latest_checkpoint, save_checkpoint
from .cli.device_flags import add_device_argument, add_precision_argument
from .cli.flag_aliases import add_hidden_alias
from .cli.recipes import STAGE2_RECIPES, explicitly_given, mark_recipe_defaults, resolve_recipe
from .optim import SCHEDULES, adamw_param_groups, build_scheduler
from .run_spine import (
    RunPlace,
    RunStart,
    add_distributed_arguments,
    autocast_factory,
    distributed_run,
    finish_run,
    locked_out_folder,
    open_run_log,
    options_config,
    prepare_out_folder,
    settings_from,
    start_or_resume,
    write_run_config,
)
from .scalar_reporters import add_report_to_argument, check_report_to
from .stop_requests import preempted
from .training_loop import LoopRules, MicroBatches, StepDone, StepWork, run_steps

logger = logging.getLogger(__name__)

# Options that change what the run computes: a resumed run must agree on them to continue exactly.
RESUME_MUST_MATCH = ("data", "embeddings", "text_tower", "loss", "caption", "batch_size", "grad_accum",
                     "seed", "steps", "epochs", "lr", "wd", "llrd", "warmup", "schedule", "min_lr_ratio",
                     "beta1", "beta2", "eps", "data_weights", "dataset_resampled",
                     "grad_clip",
                     "freeze_vision_layers", "embed_dim", "image_size", "vision_preset", "vision_path",
                     "init_model", "vision_timm", "vision_timm_args", "vision_timm_checkpoint",
                     "logit_scale_init", "adapter_blocks", "adapter_expansion",
                     "adapter_dropout", "precision",
                     "world_size", "fsdp", "crop_scale", "global_batch_size", "keep_projection", "decode")


# -------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stage2`` sub-command's options, one function per option group (in --help order)."""
    _add_io_arguments(parser)
    _add_model_arguments(parser)
    _add_training_arguments(parser)
    _add_step_arguments(parser)
    _add_run_arguments(parser)
    _add_stream_arguments(parser)
    mark_recipe_defaults(parser, STAGE2_RECIPES)


def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, the embedding cache, the run folder (resume/overwrite), a model to start from."""
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--embeddings", help="embedding cache folder written by the embed step "
                    "(required for the llm-adapter text tower)")
    io.add_argument("--data", required=True,
                    help="caption source: manifest (.csv/.tsv/.jsonl) or WebDataset shards, local or "
                    "streamed ('https://host/d-{000..099}.tar', 'pipe:aws s3 cp s3://b/d-{0..9}.tar -', "
                    "'s3://...')")
    io.add_argument("--data-weights", default=None, metavar="W1,W2,...",
                    help="with a ';' --data mix ('data/cc3m/{00..287}.tar;data/cc12m/{00..1001}.tar', the "
                    "official --train-data-list): each global batch comes from one part, drawn by these "
                    "relative weights (default: the parts' sample counts, as the official "
                    "--train-num-samples-list); the parts' keys get their folder name as prefix (embed the "
                    "same --data)")
    io.add_argument("--dataset-resampled", action="store_true",
                    help="draw each batch's samples with replacement from its part (the official "
                    "--dataset-resampled) instead of a shuffled pass")
    io.add_argument("--out", required=True, help="run folder (log, checkpoints, loss.png, model/)")
    io.add_argument("--resume", action="store_true",
                    help="continue from the newest usable checkpoint in --out (an error if there is none)")
    io.add_argument("--overwrite", action="store_true",
                    help="delete what --out holds and start over (without it, a non-empty --out is an error)")
    io.add_argument("--image-root-only", action="store_true",
                    help="manifest image paths must stay inside the manifest's folder (others are bad "
                    "samples)")
    io.add_argument("--init-model", help="start from a saved LLM2CLIPModel folder instead of a fresh one "
                    "(its architecture replaces the model options)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The text tower, the vision tower and its sizes, the adapter, frozen layers."""
    model = parser.add_argument_group("model")
    model.add_argument("--text-tower", choices=("llm-adapter", "clip"), default="llm-adapter",
                       help="llm-adapter: adapter on cached LLM embeddings (LLM2CLIP); clip: CLIP text "
                       "transformer from scratch on 77 tokens (the baseline)")
    model.add_argument("--vision-preset", default=None,
                       help=f"random-init vision tower: one of {sorted(VISION_PRESETS)} (default demo-tiny)")
    model.add_argument("--vision-path",
                       help="local transformers CLIP/SigLIP/ViT folder to start the tower from")
    model.add_argument("--vision-timm", metavar="MODEL_NAME",
                       help="random-init timm ViT-style tower, e.g. eva02_base_patch16_clip_224 (needs timm: "
                       "pip install \"llm2clip_fast[timm]\"; nothing is downloaded; a converted EVA-CLIP "
                       "model continues with --init-model instead)")
    model.add_argument("--vision-timm-checkpoint", metavar="FILE", default=None,
                       help="with --vision-timm: start the timm tower from this local weights file "
                       "(.safetensors, or .pt/.pth/.bin read with torch.load(weights_only=True)) through the "
                       "model family's checkpoint filter, as timm loads pretrained weights (an EVA-CLIP or "
                       "OpenCLIP checkpoint's visual.* works for timm's EVA02-CLIP models)")
    model.add_argument("--logit-scale-init", choices=("pretrained", "new"), default="pretrained",
                       help="where the logit scale starts with a pretrained tower (--vision-path, "
                       "--vision-timm-checkpoint): pretrained (default) = the checkpoint's logit_scale "
                       "(and SigLIP logit_bias), as the official LLM2CLIP run keeps it (CLIP-trained towers "
                       "sit near ln 100); new = ln(1/0.07) (SigLIP: ln 10, bias -10). A checkpoint without "
                       "one starts new either way (logged)")
    model.add_argument("--vision-timm-args", metavar="JSON", default=None,
                       help="with --vision-timm: timm.create_model keyword arguments as a JSON object, e.g. "
                       "'{\"img_size\": 224, \"drop_path_rate\": 0.1}'")
    model.add_argument("--embed-dim", type=int, default=512, help="shared embedding size (default 512)")
    model.add_argument("--keep-projection", action="store_true",
                       help="with --vision-path to a transformers CLIP folder: start from its "
                       "visual_projection (its output size must equal --embed-dim) instead of a new one "
                       "(the default, as the official recipe)")
    model.add_argument("--image-size", type=int, default=None,
                       help="image side for preprocessing; must equal the tower's (default: the tower's)")
    model.add_argument("--adapter-blocks", type=int, default=4)
    model.add_argument("--adapter-expansion", type=int, default=2)
    model.add_argument("--adapter-dropout", type=float, default=0.0)
    model.add_argument("--clip-text-width", type=int, default=256, help="clip text tower width")
    model.add_argument("--clip-text-layers", type=int, default=4, help="clip text tower depth")
    model.add_argument("--clip-text-heads", type=int, default=4, help="clip text tower heads")
    model.add_argument("--freeze-vision-layers", type=int, default=0,
                       help="freeze the vision stem and the first N transformer layers")
    model.add_argument("--grad-checkpointing", nargs="?", const="full", default="auto",
                       choices=("auto", "none", "selective", "full"),
                       help="recompute vision-layer activations in backward: auto (default) chooses by "
                       "memory: none when the micro-batch's measured activations fit the device, else "
                       "selective (the fewest layers that fit), else full; the bare flag means full")


def _add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """How the step runs: compilation, attention kernel, DDP options (none change what it computes)."""
    step = parser.add_argument_group("step speed (results are the same whatever these say)")
    step.add_argument("--compile-tower", choices=("auto", "on", "off"), default="auto",
                      help="torch.compile each vision layer (one graph per layer shape, seconds to compile; "
                      "the compile time is logged apart from the step time): auto = on on CUDA, off on CPU "
                      "(Inductor's CPU code is not faster than eager there: bench/stage2_throughput.py) and "
                      "under --fsdp")
    step.add_argument("--attention", choices=("auto", *ATTENTION_KERNELS), default="auto",
                      help="vision attention kernel: auto = on CUDA the fastest of SDPA's flash/cuDNN/"
                      "memory-efficient kernels and xformers (transformers towers, where installed), timed "
                      "at the run's shape; elsewhere SDPA's own choice (checked and logged)")
    step.add_argument("--ddp-bucket-mb", type=float, default=25.0,
                      help="DDP gradient bucket size: all-reduce of a full bucket overlaps the rest of the "
                      "backward (default 25, torch's)")
    step.add_argument("--ddp-static-graph", choices=("auto", "on", "off"), default="auto",
                      help="DDP static_graph (the same parameters get gradients in every step, so DDP skips "
                      "its per-step search): auto = on when --grad-accum is 1 (the accumulation passes "
                      "detach the logit scale in all but the last pass)")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Loss, captions, batch, length, optimizer, schedule, precision, device."""
    train = parser.add_argument_group("training")
    train.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    train.add_argument("--caption", default="long",
                       help="cached caption to train on: a caption name (default long), 'random' (a random "
                       "one of the cached captions per sample and epoch) or a weighted mix "
                       "'NAME:W,NAME:W' such as 'short:0.5,long:0.5' (weights > 0, normalised; each "
                       "sample draws its caption by weight, seeded per sample and epoch)")
    batch = train.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=64, help="images per rank per micro-batch")
    batch.add_argument("--global-batch-size", type=int, default=None, metavar="N",
                       help="images per optimizer step over all ranks and micro-batches, instead of "
                       "--batch-size: each rank's micro-batch becomes N / (world size x --grad-accum), "
                       "which must be a whole number (e.g. 4096 on 8 GPUs: 512 per GPU, or 64 with "
                       "--grad-accum 8)")
    train.add_argument("--grad-accum", type=int, default=1,
                       help="micro-batches per step; negatives span all of them (global batch = "
                       "batch-size x world-size x grad-accum)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    train.add_argument("--lr", type=float, default=5e-4)
    add_hidden_alias(train, "--wd", train.add_argument(
        "--weight-decay", dest="wd", type=float, default=0.05, help="AdamW weight decay (matrices only)"))
    train.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (default 0.9)")
    train.add_argument("--beta2", type=float, default=0.98,
                       help="AdamW beta2 (default 0.98, OpenCLIP's for ViTs; --recipe llm2clip: 0.999)")
    train.add_argument("--eps", type=float, default=1e-6,
                       help="AdamW eps (default 1e-6, OpenCLIP's for ViTs; --recipe llm2clip: 1e-8)")
    train.add_argument("--llrd", type=float, default=0.85,
                       help="layer-wise lr decay of the vision tower (1: off)")
    add_hidden_alias(train, "--warmup", train.add_argument(
        "--warmup-steps", dest="warmup", type=int, default=None,
        help="warmup steps (default: 5%% of the steps)"))
    train.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    train.add_argument("--min-lr-ratio", type=float, default=0.0)
    add_hidden_alias(train, "--grad-clip", train.add_argument(
        "--max-grad-norm", dest="grad_clip", type=float, default=1.0, help="max global grad norm (0: off)"))
    add_precision_argument(train)
    train.add_argument("--crop-scale", type=float, nargs=2, default=(0.9, 1.0), metavar=("MIN", "MAX"),
                       help="random resized crop area range")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun")
    add_device_argument(train)
    add_distributed_arguments(train)
    train.add_argument("--cache-verify", choices=("full", "size"), default="full",
                       help="check the cache's shard checksums (full) or only their shapes (size, fast)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Loader workers, checkpoints, logging, bad-data tolerance, reporters."""
    run = parser.add_argument_group("run")
    run.add_argument("--num-workers", type=int, default=2, help="data loader workers per rank")
    run.add_argument("--prefetch-factor", type=int, default=None,
                     help="batches each loader worker prepares ahead (DataLoader's prefetch_factor; "
                     "default 2)")
    run.add_argument("--decode", choices=("exact", "reduced", "gpu"), default="exact",
                     help="how training JPEGs are decoded: exact (full size, PIL; the default), reduced "
                     "(at 1/2, 1/4 or 1/8 size where every possible crop keeps the tower's size: fewer CPU "
                     "cores per GPU, pixels differ slightly), gpu (nvJPEG through torchvision on the "
                     "training GPU; workers only read bytes and draw crops; pixels differ slightly). "
                     "Evaluation always decodes exactly")
    run.add_argument("--pixel-dtype", choices=("uint8", "float32"), default="uint8",
                     help="what loader workers hand over: uint8 pixels, normalised on the device (a "
                     "quarter of the bytes to copy; the same numbers bit for bit; the default), or "
                     "normalised float32")
    run.add_argument("--save-every", type=int, default=500,
                     help="checkpoint every N steps (0: only at the end)")
    run.add_argument("--keep-checkpoints", type=int, default=2)
    run.add_argument("--log-every", type=int, default=10, help="log line every N steps")
    run.add_argument("--max-bad-fraction", type=float, default=0.01,
                     help="stop when more than this fraction of samples is bad (default 1%%), checked during "
                     "each epoch once 100 samples were seen, and at each epoch's end whatever the number")
    add_hidden_alias(run, "--no-progress", run.add_argument(
        "--quiet", dest="no_progress", action="store_true", help="no progress bar"))
    add_report_to_argument(run)


def _add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """Streamed shards: shuffle buffer, stall timeout, retries."""
    stream = parser.add_argument_group("streamed shards (--data with pipe:, http(s)://, s3://, gs://, ...)")
    stream.add_argument("--shuffle-buffer", type=int, default=1000,
                        help="samples per seeded shuffle block of each loader worker's stream")
    stream.add_argument("--stream-timeout", type=float, default=60.0,
                        help="seconds a shard connection or read may stall before it is retried")
    stream.add_argument("--stream-retries", type=int, default=3,
                        help="retries per shard read; then the shard's unread samples count as bad data")


# -------------------------------------------------------------------------------------------------
# Set-up checks


def _check_finite_options(args: argparse.Namespace) -> None:
    """Every real-valued option is a finite number, named by its flag: ``--lr inf`` would pass the range
    checks and fail at the second step, ``--max-grad-norm nan`` turn every weight into nan (then
    reported as the logit scale's fault)."""
    finite = {"lr": args.lr, "weight-decay": args.wd, "max-grad-norm": args.grad_clip, "beta2": args.beta2,
              "beta1": getattr(args, "beta1", 0.9), "eps": getattr(args, "eps", 1e-6),
              "llrd": args.llrd, "min-lr-ratio": args.min_lr_ratio, "adapter-dropout": args.adapter_dropout,
              "epochs": args.epochs, "stream-timeout": args.stream_timeout,
              "max-bad-fraction": args.max_bad_fraction}
    for flag, value in finite.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{flag} must be a finite number, got {value}")
    if not all(math.isfinite(v) for v in args.crop_scale):
        raise ValueError(f"--crop-scale must be two finite numbers, got {list(args.crop_scale)}")
    if args.grad_clip < 0:
        raise ValueError(f"--max-grad-norm must be >= 0 (0: no clipping), got {args.grad_clip}")


def _check_options(args: argparse.Namespace) -> None:
    _check_finite_options(args)
    positive = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "embed_dim": args.embed_dim,
                "log_every": args.log_every}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.epochs is not None and not args.epochs > 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs}")
    if args.lr <= 0 or args.wd < 0:
        raise ValueError(f"--lr must be > 0 and --weight-decay >= 0, got {args.lr} and {args.wd}")
    check_report_to(args.report_to)
    if not 0 < args.llrd <= 1:
        raise ValueError(f"--llrd must be in (0, 1], got {args.llrd}")
    for flag, beta in (("beta1", getattr(args, "beta1", 0.9)), ("beta2", args.beta2)):
        if not 0 <= beta < 1:
            raise ValueError(f"--{flag} must be in [0, 1), got {beta}")
    if not getattr(args, "eps", 1e-6) > 0:
        raise ValueError(f"--eps must be > 0, got {args.eps}")
    if args.shuffle_buffer < 1 or args.stream_retries < 0 or not args.stream_timeout > 0:
        raise ValueError("--shuffle-buffer must be >= 1, --stream-retries >= 0 and --stream-timeout > 0")
    if args.prefetch_factor is not None and args.prefetch_factor < 1:
        raise ValueError(f"--prefetch-factor must be >= 1, got {args.prefetch_factor}")
    if args.decode == "gpu" and args.pixel_dtype != "uint8":
        raise ValueError("--decode gpu hands the GPU uint8 pixels: drop --pixel-dtype float32")
    if not args.ddp_bucket_mb > 0:
        raise ValueError(f"--ddp-bucket-mb must be > 0, got {args.ddp_bucket_mb}")
    if args.save_every < 0 or args.num_workers < 0 or args.freeze_vision_layers < 0:
        raise ValueError("--save-every, --num-workers and --freeze-vision-layers must be >= 0")
    vision_timm = getattr(args, "vision_timm", None)
    if sum(bool(v) for v in (args.vision_preset, args.vision_path, vision_timm)) > 1:
        raise ValueError("give one of --vision-preset, --vision-path and --vision-timm, not several")
    if args.init_model and (args.vision_preset or args.vision_path or vision_timm):
        raise ValueError("--init-model brings its own vision tower; drop --vision-preset/--vision-path/"
                         "--vision-timm")
    if getattr(args, "vision_timm_checkpoint", None) is not None and not vision_timm:
        raise ValueError("--vision-timm-checkpoint goes with --vision-timm (the timm model it loads into)")
    if getattr(args, "vision_timm_args", None) is not None:
        if not vision_timm:
            raise ValueError("--vision-timm-args goes with --vision-timm")
        _timm_model_args(args.vision_timm_args)
    if getattr(args, "keep_projection", False) and not args.vision_path:
        why = ("--init-model already starts from its own projection" if args.init_model
               else "a preset tower has none")
        raise ValueError("--keep-projection keeps the visual_projection of a pretrained CLIP folder: it "
                         f"needs --vision-path ({why})")
    if args.text_tower == "llm-adapter" and not args.embeddings:
        raise ValueError("--embeddings DIR is required for the llm-adapter text tower (run the embed step "
                         "first), or use --text-tower clip")
    if args.text_tower == "clip" and args.embeddings:
        raise ValueError("--text-tower clip trains on raw captions; drop --embeddings")


def resolve_batch_size(args: argparse.Namespace, world_size: int) -> None:
    """With ``--global-batch-size N`` (given, or from ``--recipe``): set the per-rank micro-batch
    ``args.batch_size`` to N / (world size x grad-accum) and record it as derived in ``recipe_origin``."""
    total = getattr(args, "global_batch_size", None)
    if total is None:
        return
    if "batch_size" in explicitly_given(args):
        raise ValueError("give one of --batch-size (per rank per micro-batch) and --global-batch-size "
                         "(over all ranks and micro-batches), not both")
    if total < 1:
        raise ValueError(f"--global-batch-size must be >= 1, got {total}")
    share = world_size * args.grad_accum
    if total % share:
        raise ValueError(f"--global-batch-size {total} is not a multiple of world size {world_size} x "
                         f"--grad-accum {args.grad_accum} = {share}: each rank's micro-batch must be a whole "
                         "number of images; change --grad-accum, the number of ranks or --global-batch-size")
    args.batch_size = total // share
    origin = getattr(args, "recipe_origin", None)
    if origin is not None:
        origin["batch_size"] = "derived"


def open_cache(path: str, verify: str = "full") -> Any:
    from ..data.embedding_cache import EmbeddingCache

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--embeddings {path!r} is not a folder; run the embed step first "
                                "(python -m llm2clip_fast.train embed --llm PATH --data SOURCE --out DIR)")
    return EmbeddingCache.open(path, verify=True if verify == "full" else "size")


def check_cache_names(cache: Any, caption_names: list[str]) -> None:
    """Every caption the run may pick is in the cache."""
    missing_names = [n for n in caption_names if n not in cache.caption_names]
    if missing_names:
        raise ValueError(f"caption {missing_names} is not in the embedding cache, which holds "
                         f"{list(cache.caption_names)}; pick --caption among those (or 'random')")


def check_cache_covers(cache: Any, source: Any, caption_names: list[str]) -> None:
    """Every key of the data has a cached embedding for every caption the run may pick (keys the embed
    step skipped for an empty caption excepted: the loader drops those samples as bad data), and the
    cache was built from the data's caption texts (:class:`StaleCacheError` naming the first key that
    differs)."""
    from ..data.bad_data import BadDataTracker
    check_cache_names(cache, caption_names)
    keys = source.keys()
    missing = [k for k in keys if k not in cache and k not in cache.skipped]
    if missing:
        raise ValueError(f"the embedding cache {cache.directory} lacks embeddings for {len(missing)} of the "
                         f"{len(keys)} keys of the data, e.g. {missing[:5]}; run the embed step on this data")
    if not cache.has_caption_fingerprints:
        logger.warning("stage2: the embedding cache %s predates caption fingerprints, so it cannot be "
                       "checked against the data's captions; rerun the embed step on it to record them",
                       cache.directory)
        return
    if cache.metadata.get("captions_unverified"):
        logger.warning("stage2: the embedding cache %s was imported with --trust-embedding-keys (no caption "
                       "texts): its keys are checked, its captions cannot be", cache.directory)
        return
    # A private tracker that never stops: bad samples are the loader's business, counted there.
    cache.check_captions(source.iter_captions(bad_data=BadDataTracker(1.0)), caption_names)


def check_batch_in_cache(cache: Any, batch: dict[str, Any], caption_names: list[str]) -> None:
    """:func:`check_cache_covers` for one batch of streamed data (checking the whole stream up front
    would read every shard): its keys are cached and their captions match the cache's fingerprints."""
    missing = [k for k in batch["keys"] if k not in cache]
    if missing:
        raise ValueError(f"the embedding cache {cache.directory} lacks embeddings for {len(missing)} key(s) "
                         f"of a batch of the streamed data, e.g. {missing[:5]}; run the embed step on this "
                         "data")
    if cache.has_caption_fingerprints and not cache.metadata.get("captions_unverified"):
        cache.check_captions(zip(batch["keys"], batch["all_captions"]), caption_names)


def llm_provenance(cache_metadata: dict[str, Any],
                   encoder_fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the saved model records about the LLM behind its cache (``config.llm``): the cache's
    metadata (encoder options) plus ``path``, the LLM to load to embed new captions the same way, and
    ``weights_sha256``, its files' hashes from the cache's encoder fingerprint, which eval checks the
    LLM against (:mod:`~llm2clip_fast.models.llm_fingerprint`). Credentials in the recorded data
    source are masked."""
    from ..models.llm_fingerprint import RECORD_KEY

    info = redact_value(dict(cache_metadata))
    path = info.get("path") or info.get("model")
    if path:
        info["path"] = path
    weights = (encoder_fingerprint or {}).get("weights")
    if isinstance(weights, dict) and weights:
        info[RECORD_KEY] = dict(weights)
    return info


# -------------------------------------------------------------------------------------------------
# Model, optimizer


def _timm_model_args(text: str | None) -> dict[str, Any]:
    """``--vision-timm-args``: a JSON object of timm.create_model keyword arguments."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--vision-timm-args is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--vision-timm-args must be a JSON object, got {type(value).__name__}")
    return value


def build_model(args: argparse.Namespace, llm_dim: int | None, llm_info: dict[str, Any]) -> LLM2CLIPModel:
    if args.init_model:
        model = LLM2CLIPModel.from_pretrained(args.init_model)
        if model.config.text_tower != args.text_tower:
            raise ValueError(f"--init-model has the {model.config.text_tower!r} text tower but the run asks "
                             f"for --text-tower {args.text_tower}")
        if llm_dim is not None and model.config.llm_dim != llm_dim:
            raise ValueError(f"dimension mismatch: the embedding cache holds {llm_dim}-d embeddings but "
                             f"the adapter of --init-model {args.init_model} takes "
                             f"llm_dim={model.config.llm_dim}")
        if model.config.loss != args.loss:
            raise ValueError(f"--init-model was trained with --loss {model.config.loss}; the run asks for "
                             f"{args.loss}")
        if llm_info:
            model.config.llm = llm_info
        return model
    vision_timm = getattr(args, "vision_timm", None)
    pretrained: tuple[dict[str, torch.Tensor], str] | None = None
    if vision_timm:
        tower = VisionTower.from_timm(vision_timm, _timm_model_args(getattr(args, "vision_timm_args", None)))
        checkpoint = getattr(args, "vision_timm_checkpoint", None)
        if checkpoint:
            from ..models.timm_vision import load_checkpoint_file

            pretrained = (load_checkpoint_file(tower.model, checkpoint), str(checkpoint))
            _say(f"vision tower {vision_timm} loaded from {checkpoint}")
    else:
        tower = build_vision_tower(preset=args.vision_preset or (None if args.vision_path else "demo-tiny"),
                                   path=args.vision_path)
    text: dict[str, Any]
    if args.text_tower == "llm-adapter":
        text = {"llm_dim": llm_dim, "adapter": {"num_blocks": args.adapter_blocks,
                                                "expansion": args.adapter_expansion,
                                                "dropout": args.adapter_dropout}}
    else:
        text = {"clip_text": {"width": args.clip_text_width, "layers": args.clip_text_layers,
                              "heads": args.clip_text_heads, "embed_dim": args.embed_dim}}
    config = LLM2CLIPConfig(vision=tower.config_dict(), embed_dim=args.embed_dim, text_tower=args.text_tower,
                            loss=args.loss, llm=llm_info, **text)
    # Read and checked before the model is built, so a bad projection fails before any weight is made.
    from ..convert.hf_clip import load_kept_projection

    kept = (load_kept_projection(args.vision_path, args.embed_dim, tower.hidden_size)
            if getattr(args, "keep_projection", False) else None)
    model = LLM2CLIPModel(config, vision_tower=tower)
    if kept is not None:
        with torch.no_grad():
            model.visual_projection.weight.copy_(kept)
    if args.vision_path:
        from .pretrained_start import folder_logit_tensors

        tensors, unreadable = folder_logit_tensors(args.vision_path)
        if unreadable:
            _say(f"logit scale starts new ({unreadable}): {model.logit_scale.item():.4f}")
        else:
            pretrained = (tensors, str(args.vision_path))
    if pretrained is not None:
        from .pretrained_start import start_logit_params

        _say(start_logit_params(model, pretrained[0], getattr(args, "logit_scale_init", "pretrained"),
                                pretrained[1]))
    return model


def lr_multipliers(model: LLM2CLIPModel, decay: float) -> dict[str, float]:
    """Layer-wise lr decay over the vision tower's depth; 1.0 for everything else."""
    tower = model.vision
    top = tower.num_layers + 1
    return {f"vision.{name}": decay ** (top - tower.layer_id(name)) for name, _ in tower.named_parameters()}


def build_optimizer(model: LLM2CLIPModel, args: argparse.Namespace, named_params,
                    fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (LLRD groups). ``fused``: one multi-tensor kernel per
    group instead of a loop of element-wise ops per parameter (CPU and CUDA; not for FSDP shards)."""
    groups = adamw_param_groups(named_params, args.wd, lr=args.lr,
                                lr_multipliers=lr_multipliers(model, args.llrd) if args.llrd < 1 else None,
                                no_decay_names={f"vision.{n}" for n in model.vision.no_weight_decay_names()})
    for g in groups:
        g.pop("param_names", None)  # not part of AdamW's state; keeps state dicts plain
    betas, eps = (getattr(args, "beta1", 0.9), args.beta2), getattr(args, "eps", 1e-6)
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=eps, fused=fused or None)


# -------------------------------------------------------------------------------------------------
# Loss and the step


def contrastive_loss(kind: str, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None) -> torch.Tensor:
    """The global-batch loss of this rank's features: the losses' distributed mode when several
    ranks run (negatives span every rank), the plain fused loss otherwise."""
    extra = {"distributed": True} if is_distributed() and get_world_size() > 1 else {}
    if kind == "clip":
        from ..ops.clip_loss import clip_loss

        return clip_loss(image, text, logit_scale, **extra)
    from ..ops.siglip_loss import siglip_loss

    return siglip_loss(image, text, logit_scale, logit_bias, **extra)


@dataclass
class MicroBatch:
    pixel_values: torch.Tensor
    text_inputs: tuple[torch.Tensor, ...]

    @property
    def size(self) -> int:
        return int(self.pixel_values.shape[0])


def _rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def _gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the cross-rank gradient reduction of a backward that is not the step's last (DDP, FSDP2)."""
    if enabled:
        yield
    elif hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def train_step(wrapped: nn.Module, micro: list[MicroBatch], loss_kind: str, autocast: Any,
               device: torch.device, loss_fn: Any = None) -> float:
    """Forward + backward of one optimizer step's micro-batches (gradients accumulate in ``.grad``).

    One micro-batch: the plain step. Several: every micro-batch's features are computed without grad,
    then each is recomputed with grad and the loss over all micro-batches back-propagated through its
    slice only; the logit scale/bias get their gradient once (in the last pass). Under DDP the
    gradient all-reduce runs once, in the last pass. ``loss_fn`` replaces :func:`contrastive_loss`
    (same signature; benchmarks pass a plain-torch loss). Returns the loss.
    """
    loss_fn = contrastive_loss if loss_fn is None else loss_fn
    if len(micro) == 1:
        with autocast():
            out = wrapped(micro[0].pixel_values, *micro[0].text_inputs)
            loss = loss_fn(loss_kind, out["image_features"], out["text_features"], out["logit_scale"],
                           out.get("logit_bias"))
        loss.backward()
        return float(loss.detach())

    rng, images, texts = [], [], []
    with torch.no_grad():
        for mb in micro:
            rng.append(_rng_snapshot(device))
            with autocast():
                out = wrapped(mb.pixel_values, *mb.text_inputs)
            images.append(out["image_features"])
            texts.append(out["text_features"])
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        _rng_restore(rng[i], device)
        with _gradient_sync(wrapped, enabled=last):
            with autocast():
                out = wrapped(mb.pixel_values, *mb.text_inputs)
                image = torch.cat([*images[:i], out["image_features"], *images[i + 1:]])
                text = torch.cat([*texts[:i], out["text_features"], *texts[i + 1:]])
                scale, bias = out["logit_scale"], out.get("logit_bias")
                if not last:
                    scale = scale.detach()
                    bias = bias.detach() if bias is not None else None
                loss = loss_fn(loss_kind, image, text, scale, bias)
            loss.backward()
    return float(loss.detach())


# -------------------------------------------------------------------------------------------------
# Data


def batch_stream(loader: Any, epoch: int, start_batch: int) -> Iterator[tuple[dict[str, Any], int, int]]:
    """Batches across epochs, each with the data position after it: (batch, epoch, next slot)."""
    while True:
        loader.set_epoch(epoch, start_batch)
        for batch in loader:
            yield batch, epoch, loader.next_batch
        epoch += 1
        start_batch = 0


def text_inputs_of(batch: dict[str, Any], model: LLM2CLIPModel, cache: Any | None,
                   device: torch.device) -> tuple[torch.Tensor, ...]:
    if cache is None:
        ids, mask = model.tokenize(batch["captions"])
        return ids.to(device), mask.to(device)
    keys, names = batch["keys"], batch["caption_names"]
    out = torch.empty(len(keys), cache.dim, dtype=torch.float32)
    for name in sorted(set(names)):
        rows = [i for i, n in enumerate(names) if n == name]
        out[rows] = cache.lookup([keys[i] for i in rows], name).float()
    return (out.to(device, non_blocking=True),)


def global_loss(local_loss: float, local_count: int, device: torch.device) -> float:
    """The loss of the whole global batch. Under the distributed losses each rank returns the mean
    over its own rows; the global value is their mean weighted by the rows each rank holds."""
    if not is_distributed() or get_world_size() == 1:
        return local_loss
    both = torch.tensor([local_loss * local_count, float(local_count)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(both)
    return float(both[0] / both[1])


# A batch's per-sample lists besides the pixels.
_PER_SAMPLE_KEYS = ("keys", "captions", "caption_names", "all_captions", "labels")


def equalise_across_ranks(batch: dict[str, Any], device: torch.device) -> int:
    """Trim this rank's batch to the smallest local batch of all ranks (bad samples make batches
    uneven; the global-batch loss needs equal shards). Returns how many samples were trimmed.
    ``device``: the trainer's, where the collective's tensor must live (NCCL takes no CPU tensors)."""
    if not is_distributed():
        return 0
    n = torch.tensor([len(batch["keys"])], device=device)
    smallest = n.clone()
    torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
    cut = int(n - smallest)
    if cut:
        keep = int(smallest)
        for k in _PER_SAMPLE_KEYS:
            if k in batch:
                batch[k] = batch[k][:keep]
        batch["pixel_values"] = batch["pixel_values"][:keep]
    return cut


# -------------------------------------------------------------------------------------------------
# Several ranks


def _wrap_distributed(model: LLM2CLIPModel, args: argparse.Namespace, device: torch.device,
                      ddp_options: dict[str, Any] | None = None) -> nn.Module:
    if not is_distributed() or get_world_size() == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.vision.layer_modules():
            fully_shard(layer)
        # FSDP2 cannot shard 0-d parameters: the logit scale/bias stay replicated and their gradients
        # are averaged by hand (average_replicated_grads), as DDP would.
        fully_shard(model, ignored_params=set(replicated_scalars(model)))
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Gradients bucketed (--ddp-bucket-mb) and all-reduced as each bucket fills, overlapping the rest of
    # the backward; gradient_as_bucket_view: .grad are views into the buckets (no second copy).
    options = dict(ddp_options or {})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   bucket_cap_mb=options.get("bucket_cap_mb", 25.0),
                                   gradient_as_bucket_view=options.get("gradient_as_bucket_view", True),
                                   static_graph=options.get("static_graph", False))


def replicated_scalars(model: LLM2CLIPModel) -> list[nn.Parameter]:
    return [p for p in (model.logit_scale, model.logit_bias) if p is not None and p.requires_grad]


def average_replicated_grads(params: list[nn.Parameter]) -> None:
    """Average gradients of parameters FSDP does not manage over the ranks (what DDP does)."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= get_world_size()


def _full_state(model: LLM2CLIPModel, args: argparse.Namespace, optimizer=None):
    """Model (and optimizer) state dicts with whole tensors on CPU; collective under FSDP."""
    if args.fsdp and is_distributed() and get_world_size() > 1:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=opts)
        opt_state = (get_optimizer_state_dict(model, optimizer, options=opts)
                     if optimizer is not None else None)
        return model_state, opt_state
    return model.state_dict(), (optimizer.state_dict() if optimizer is not None else None)


class _StateOf:
    """Hands a precomputed state dict to save_checkpoint, which asks for ``.state_dict()``."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# -------------------------------------------------------------------------------------------------
# The run, step by step (the spine's parts in .run_spine)


def _say(message: str) -> None:
    logger.info("stage2: %s", message)


@dataclass
class TrainData:
    """The run's data: the caption source, the embedding cache (None for the clip text tower), the
    ``--caption`` mix resolved against the data (what the loader draws from) and the cache's LLM."""

    source: Any
    cache: Any | None
    caption: CaptionMix
    llm_info: dict[str, Any]

    @property
    def caption_names(self) -> list[str]:
        """The captions a sample may train on (each must be cached)."""
        return list(self.caption.names)

    @property
    def streamed(self) -> bool:
        return bool(getattr(self.source, "streaming", False))


def open_train_data(args: argparse.Namespace, caption: CaptionMix) -> TrainData:
    """Open ``--data`` and ``--embeddings``, resolve ``caption`` (``--caption``, parsed) against them and
    check that the cache holds the data's captions: every key up front, or, for streamed data, each batch
    as it arrives."""
    from ..data.sources import open_source
    from ..data.stream_transport import TransportPolicy

    source = open_source(args.data, image_root_only=args.image_root_only,
                         transport=TransportPolicy(timeout=args.stream_timeout, retries=args.stream_retries),
                         mix_weights=getattr(args, "data_weights", None),
                         resampled=getattr(args, "dataset_resampled", False))
    if hasattr(source, "as_dict"):
        _say(f"--data: {source.describe()}")
    cache = open_cache(args.embeddings, args.cache_verify) if args.text_tower == "llm-adapter" else None
    try:
        # 'random' picks among the captions that are both in the data and in the cache.
        caption = caption.resolve(source.caption_names, "the data",
                                  also_in=list(cache.caption_names) if cache is not None else None)
    except ValueError as exc:
        if (getattr(args, "recipe_origin", None) or {}).get("caption") == "recipe":
            raise ValueError(f"{exc} (--caption {args.caption} came from --recipe {args.recipe}; give "
                             "--caption to override it)") from None
        raise
    data = TrainData(source, cache, caption, {})
    if cache is not None:
        if data.streamed:
            check_cache_names(cache, data.caption_names)
            _say("streamed --data: each batch is checked against the embedding cache as it arrives (keys "
                 "present, captions unchanged) instead of reading every shard up front")
        else:
            check_cache_covers(cache, source, data.caption_names)
        data.llm_info = llm_provenance(cache.metadata, cache.manifest.get("encoder_fingerprint"))
    return data


def build_run_model(args: argparse.Namespace, data: TrainData, device: torch.device) -> LLM2CLIPModel:
    """The model on ``device``, with identical initial weights on every rank (seeded), its image size
    checked against ``--image-size`` and ``--freeze-vision-layers`` applied (the step's speed options:
    :func:`configure_step`)."""
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(args, data.cache.dim if data.cache is not None else None, data.llm_info)
    image_size = model.image_size
    if args.image_size is not None and args.image_size != image_size:
        raise ValueError(f"image size mismatch: --image-size {args.image_size} but the vision tower takes "
                         f"{image_size}x{image_size} images (its {model.config.vision['kind']} config's "
                         "image_size)")
    model.vision.freeze_layers(args.freeze_vision_layers)
    return model.to(device)


@dataclass
class StepSetup:
    """How the step runs, as chosen by :func:`configure_step` and reported (log, ``config.json``'s
    ``step``): the attention kernel, the gradient checkpointing plan, per-layer compilation (and why),
    and the DDP options."""

    attention: Any
    checkpointing: Any
    compiled: bool
    compile_why: str
    ddp: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.as_dict(), "grad_checkpointing": self.checkpointing.as_dict(),
                "compile_tower": {"on": self.compiled, "why": self.compile_why}, "ddp": self.ddp}

    def summary_lines(self) -> list[str]:
        return [self.attention.summary(), self.checkpointing.summary(),
                f"vision layers compiled: {'yes' if self.compiled else 'no'} ({self.compile_why})"]


def compute_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """The dtype the tower's matrix products run in: bf16 under the run's autocast, else fp32."""
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def _probe_text_inputs(model: LLM2CLIPModel, device: torch.device):
    """Random text-side inputs of a given batch size, for the activation probe."""
    if model.config.text_tower == "llm-adapter":
        return lambda b: (torch.randn(b, model.config.llm_dim, device=device),)
    return lambda b: tuple(t.to(device) for t in model.tokenize(["a photo"] * b))


def configure_step(args: argparse.Namespace, model: LLM2CLIPModel, device: torch.device,
                   world_size: int) -> StepSetup:
    """Set the step's speed options on ``model`` (before it is wrapped for the ranks) and say what was
    chosen: the attention kernel (``--attention``; checked, on CUDA timed), gradient checkpointing by
    memory (``--grad-checkpointing``, see :mod:`.step_memory`), then per-layer ``torch.compile``
    (``--compile-tower``). None of them changes what the step computes."""
    from ..models.attention_kernels import choose_kernel
    from . import step_memory

    tower = model.vision
    dtype = compute_dtype(args, device)
    autocast = autocast_factory(args.precision, device)
    forced = None if args.attention == "auto" else args.attention
    shape = tower.attention_shape(min(args.batch_size, 64), device, dtype)
    attention = choose_kernel(shape, xformers_ok=tower.kind != "timm", forced=forced)
    # Pin what was forced or timed; SDPA's own per-call choice stands where it was only observed.
    tower.set_attention_kernel(attention.kernel if attention.how != "sdpa default" else None)

    request = args.grad_checkpointing
    profile = None
    if request in ("auto", "selective"):
        profile = step_memory.profile_activations(model, device, autocast, _probe_text_inputs(model, device))
    budget, _free = step_memory.device_budget_bytes(device, step_memory.state_bytes(model))
    global_batch = args.batch_size * world_size * args.grad_accum
    plan = step_memory.plan_checkpointing(request, profile, args.batch_size, tower.num_layers, budget,
                                          extra_bytes=step_memory.loss_bytes(args.batch_size, global_batch))
    tower.set_gradient_checkpointing(plan.layers)

    fsdp = args.fsdp and world_size > 1
    if args.compile_tower == "auto":
        compiled = device.type == "cuda" and not fsdp
        why = ("auto: on CUDA" if compiled else
               "auto: off under --fsdp (FSDP2's per-layer hooks)" if fsdp else
               f"auto: off on {device.type} (Inductor's CPU code is no faster than eager here)")
    else:
        compiled, why = args.compile_tower == "on", "as asked"
    if compiled:
        tower.compile_layers()
    ddp = {}
    if world_size > 1 and not fsdp:
        static = args.ddp_static_graph == "on" or (args.ddp_static_graph == "auto" and args.grad_accum == 1)
        ddp = {"bucket_cap_mb": args.ddp_bucket_mb, "static_graph": static, "gradient_as_bucket_view": True}
    return StepSetup(attention, plan, compiled, why, ddp)


@dataclass(frozen=True)
class StepPlan:
    """How long the run is: optimizer steps and warmup steps."""

    total_steps: int
    warmup_steps: int


def plan_steps(args: argparse.Namespace, n_samples: int, world: int) -> StepPlan:
    """``--steps``, or ``--epochs`` (default 1) over each rank's full batches per ``--grad-accum``;
    warmup ``--warmup-steps`` or 5% of the steps. An error when the data cannot fill one global batch."""
    per_rank_batches = n_samples // world // args.batch_size
    if per_rank_batches < 1:
        lower = ("--global-batch-size" if getattr(args, "global_batch_size", None) is not None
                 else "--batch-size")
        raise ValueError(f"the data has {n_samples} samples, fewer than batch-size {args.batch_size} x "
                         f"{world} ranks: lower {lower}")
    if args.steps is not None:
        total_steps = args.steps
    else:
        total_steps = max(1, math.ceil((args.epochs or 1.0) * per_rank_batches / args.grad_accum))
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * total_steps))
    return StepPlan(total_steps, warmup)


def build_train_loader(args: argparse.Namespace, data: TrainData, model: LLM2CLIPModel,
                       place: RunPlace) -> Any:
    """This rank's loader of training batches: seeded shuffle, the model's own image preprocessing with
    random resized crops (``--crop-scale``), decoded as ``--decode`` says and handed over as
    ``--pixel-dtype`` (pinned on CUDA), full batches only, bad samples counted against
    ``--max-bad-fraction``."""
    from ..data.loader import build_loader

    crop_scale = tuple(args.crop_scale)
    decode = getattr(args, "decode", "exact")
    if decode == "gpu":
        from ..data.gpu_decode import unavailable_reason

        why = unavailable_reason(place.device)
        if why is not None:
            raise ValueError(f"--decode gpu: {why}; use --decode exact or reduced")
    transform = image_transform_for(model.preprocessing, train=True, scale=crop_scale,
                                    output=getattr(args, "pixel_dtype", "float32"))
    return build_loader(data.source, batch_size=args.batch_size, image_size=model.image_size, train=True,
                        caption=data.caption, rank=place.rank, world_size=place.world_size,
                        num_workers=args.num_workers, seed=args.seed, drop_last=True, crop_scale=crop_scale,
                        bad_data=args.max_bad_fraction, pin_memory=place.device.type == "cuda",
                        transform=transform, shuffle_buffer=args.shuffle_buffer, decode=decode,
                        prefetch_factor=getattr(args, "prefetch_factor", None))


@dataclass
class Optimisation:
    """The model as the step runs it (DDP/FSDP-wrapped under torchrun), its optimizer and schedule."""

    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    fsdp: bool


def build_optimisation(args: argparse.Namespace, model: LLM2CLIPModel, plan: StepPlan,
                       place: RunPlace, setup: StepSetup | None = None) -> Optimisation:
    """Wrap the model for the ranks (DDP with ``setup``'s options, or FSDP2 with ``--fsdp``), then AdamW
    with layer-wise lr decay and the warmup + ``--schedule`` lr schedule."""
    wrapped = _wrap_distributed(model, args, place.device, setup.ddp if setup is not None else None)
    fsdp = args.fsdp and is_distributed() and place.world_size > 1
    optimizer = build_optimizer(model, args, model.named_parameters(), fused=not fsdp)
    scheduler = build_scheduler(optimizer, args.schedule, warmup_steps=plan.warmup_steps,
                                total_steps=plan.total_steps, min_lr_ratio=args.min_lr_ratio)
    return Optimisation(wrapped, optimizer, scheduler, fsdp)


def stage2_config(args: argparse.Namespace, plan: StepPlan, data: TrainData, world: int) -> dict[str, Any]:
    """The run's config (checkpoints and ``config.json``): the resolved options, ``world_size``,
    ``settings_from`` (where each option a recipe tracks got its value: ``flag`` for the command line
    or --config, ``recipe``, ``default``, ``derived`` for the per-rank batch from
    --global-batch-size), the step plan, the global batch and the resolved caption mix."""
    config = options_config(args)
    config["world_size"] = world
    config["settings_from"] = settings_from(args)
    config.update({"total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
                   "global_batch": args.batch_size * world * args.grad_accum,
                   "caption_mix": data.caption.as_dict()})
    if hasattr(data.source, "as_dict"):
        config["data_mix"] = data.source.as_dict()
    return config


def restore_from_checkpoint(start: RunStart, args: argparse.Namespace, model: LLM2CLIPModel,
                            opt: Optimisation, loader: Any, place: RunPlace) -> None:
    """Continue where the checkpoint stopped: model, optimizer and schedule state, and this rank's
    bad-data counts, streamed-loader position and RNG streams. A fresh run seeds each rank's own
    stream (dropout) from ``--seed`` instead."""
    ckpt = start.checkpoint
    if ckpt is None:
        torch.manual_seed(args.seed * 1000 + place.rank + 1)
        return
    if args.fsdp and place.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt.optimizer, model_state_dict=ckpt.model_state,
                       optim_state_dict=ckpt.optimizer_state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict({k: v.to(place.device) for k, v in ckpt.model_state.items()})
        opt.optimizer.load_state_dict(ckpt.optimizer_state)
    opt.scheduler.load_state_dict(ckpt.scheduler_state)
    _say(f"resuming from {ckpt.path} (step {start.step}, epoch {start.epoch}, batch {start.batch_index})")
    mine = ckpt.extra["ranks"][place.rank]
    loader.bad_data.load_dict(mine["bad_data"])
    if "loader" in mine:  # a streamed source resumes at each worker's saved shard and sample
        loader.load_state_dict(mine["loader"])
    torch.set_rng_state(mine["torch_rng"])
    if place.device.type == "cuda" and mine.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(mine["cuda_rng"], place.device)


@dataclass
class Stage2Run:
    """Everything the training loop works with, set up by :func:`run`."""

    args: argparse.Namespace
    place: RunPlace
    out: Path
    data: TrainData
    model: LLM2CLIPModel
    loader: Any
    opt: Optimisation
    plan: StepPlan
    config: dict[str, Any]
    start: RunStart
    autocast: Any


@dataclass
class LoopState:
    """Where the loop is: optimizer steps done, the data position after the last batch (epoch, next
    slot), the last loss, and the counts the summary reports."""

    step: int
    pos: tuple[int, int]
    loss: float | None = None
    trimmed: int = 0
    images_done: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    step_seconds: list[float] = field(default_factory=list)


def save_run_checkpoint(run: Stage2Run, step: int, epoch: int, next_batch: int) -> None:
    """Checkpoint the run (collective: every rank's RNG, bad-data counts and loader position are
    gathered; rank 0 writes, atomically, keeping ``--keep-checkpoints``)."""
    distributed_failures.at(f"checkpoint at step {step}: gathering every rank's state (all_gather_object), "
                            "then the barrier while rank 0 writes it")
    device = run.place.device
    model_state, opt_state = _full_state(run.model, run.args, run.opt.optimizer)
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    ranks = _gather_objects({"torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
                             "bad_data": run.loader.bad_data.as_dict(), "loader": run.loader.state_dict()})
    if run.place.main:
        save_checkpoint(run.out, step=step, epoch=epoch, batch_index=next_batch, model_state=model_state,
                        optimizer=_StateOf(opt_state), scheduler=run.opt.scheduler, config=run.config,
                        extra={"ranks": ranks}, keep_last=run.args.keep_checkpoints, run_id=run.start.run_id)
    barrier()


def next_micro_batch(run: Stage2Run, stream: Iterator, state: LoopState) -> MicroBatch:
    """The next micro-batch on the device: trimmed to the smallest rank's batch, checked against the
    cache when streamed, its text side as the text tower takes it."""
    device, cache = run.place.device, run.data.cache
    batch, *pos = next(stream)
    state.pos = tuple(pos)
    pixels_to_device(batch, run.model.preprocessing, device, run.loader.bad_data)
    state.trimmed += equalise_across_ranks(batch, device)
    if run.data.streamed and cache is not None:
        check_batch_in_cache(cache, batch, run.data.caption_names)
    return MicroBatch(batch["pixel_values"], text_inputs_of(batch, run.model, cache, device))


def pixels_to_device(batch: dict[str, Any], preprocessing: Any, device: torch.device, bad_data: Any) -> None:
    """Put ``batch["pixel_values"]`` on ``device`` as normalised float32: uint8 pixels are copied (from
    pinned memory, asynchronously) and normalised there (:func:`~llm2clip_fast.data.image_transforms.
    normalize_uint8`, bit-identical to the loader's float path); ``--decode gpu`` batches are decoded there
    (:func:`~llm2clip_fast.data.gpu_decode.decode_batch`), samples nvJPEG cannot decode dropped and
    counted in ``bad_data``."""
    p = preprocessing
    if "encoded_images" in batch:
        from ..data.gpu_decode import decode_batch

        pixels, bad = decode_batch(batch.pop("encoded_images"), size=p.image_size, mean=p.mean, std=p.std,
                                   resample=p.resample, device=device)
        if bad:
            drop = {i for i, _, _ in bad}
            keep = [i for i in range(len(batch["keys"])) if i not in drop]
            for k in _PER_SAMPLE_KEYS:
                if k in batch:
                    batch[k] = [batch[k][i] for i in keep]
            for _, key, reason in bad:
                bad_data.add_bad(key, reason)
            bad_data.check()
        batch["pixel_values"] = pixels
        return
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    if pixels.dtype == torch.uint8:
        from ..data.image_transforms import normalize_uint8

        pixels = normalize_uint8(pixels, p.mean, p.std)
    batch["pixel_values"] = pixels


class Stage2Steps:
    """Stage 2 as the training loop (:mod:`.training_loop`) takes it: its micro-batches, the
    global-batch forward and backward over all of them (:func:`train_step`), the logit-scale clamp
    after each update, ``log.jsonl``'s fields and the checkpoints."""

    name = "stage 2"

    def __init__(self, run: Stage2Run, state: LoopState) -> None:
        self.run, self.state = run, state
        self.out, self.device = run.out, run.place.device
        self.trainable = [p for p in run.model.parameters() if p.requires_grad]
        # DDP and FSDP synchronise the gradients in the backward (the replicated logit scale/bias of
        # FSDP are averaged by the step itself, see forward_backward): nothing is left to the loop.
        self.hand_synced: list[nn.Parameter] = []
        self.optimizer, self.scheduler = run.opt.optimizer, run.opt.scheduler
        self._stream = batch_stream(run.loader, run.start.epoch, run.start.batch_index)

    def step_label(self, step: int) -> str:
        return f"step {step}"

    def collectives(self, step: int) -> str:
        return (f"step {step}: batch sizes (all-reduce), the global-batch loss (all-gather, reduce-scatter, "
                "all-reduce) and the gradient all-reduce")

    def next_micro_batch(self) -> MicroBatch:
        return next_micro_batch(self.run, self._stream, self.state)

    def forward_backward(self, micro: MicroBatches) -> StepWork:
        """Forward and backward of all the step's micro-batches at once (:func:`train_step`: the
        negatives span all of them); returns the global-batch loss."""
        run, device = self.run, self.device
        batches = list(micro)
        size = sum(mb.size for mb in batches)
        loss = global_loss(train_step(run.opt.wrapped, batches, run.args.loss, run.autocast, device), size,
                           device)
        if run.opt.fsdp:
            average_replicated_grads(replicated_scalars(run.model))
        return StepWork(loss, size * run.place.world_size)

    def after_update(self) -> None:
        with torch.no_grad():
            self.run.model.logit_scale.clamp_(0, MAX_LOG_LOGIT_SCALE)

    def finished(self, done: StepDone) -> None:
        state = self.state
        state.step, state.loss = done.step, done.loss
        state.step_seconds.append(done.seconds)
        state.images_done += done.units

    def log_fields(self, done: StepDone) -> dict[str, Any]:
        model = self.run.model
        record = {"step": done.step, "epoch": self.state.pos[0], "loss": done.loss, "lr": done.lr,
                  "grad_norm": done.grad_norm, "logit_scale": float(model.logit_scale_value().detach()),
                  "images_per_s": done.rate, "step_s": done.seconds}
        if model.logit_bias is not None:
            record["logit_bias"] = float(model.logit_bias.detach())
        return record

    def save_checkpoint(self, step: int) -> Path:
        save_run_checkpoint(self.run, step, *self.state.pos)
        return checkpoint_dir(self.out, step)

    def last_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out)

    def before_final_checkpoint(self) -> None:
        # The loader checks at each epoch's end; a run ending mid-epoch checks what it saw.
        self.run.loader.bad_data.check_end_of_epoch()

    def preempted(self, step: int, total: int, checkpoint: Any) -> Exception:
        return preempted(step, total, checkpoint)


def train_loop(run: Stage2Run, log: Any, progress: Any) -> LoopState:
    """The plan's optimizer steps under the training loop's rules (:mod:`.training_loop`: a
    non-finite loss or gradient stops the run before the update; step 1, every ``--log-every`` and
    the last logged; a checkpoint every ``--save-every`` steps (0: none) and after the last; SIGTERM
    and a lost lock stop at a step boundary)."""
    state = LoopState(step=run.start.step, pos=(run.start.epoch, run.start.batch_index))
    args = run.args
    rules = LoopRules(total_steps=run.plan.total_steps, grad_accum=args.grad_accum,
                      max_grad_norm=args.grad_clip, log_every=args.log_every, save_every=args.save_every)
    run.model.train()
    run_steps(Stage2Steps(run, state), rules, run.start.step, log, progress)
    return state


def step_time_summary(seconds: list[float]) -> dict[str, float]:
    """The first step's time (compilation, kernel selection, allocator warm-up) apart from the steady
    steps': ``first_step_s``, ``median_step_s`` (the others) and ``warmup_s`` (their difference, mostly
    compile time when --compile-tower is on)."""
    if len(seconds) < 2:
        return {"first_step_s": seconds[0]} if seconds else {}
    steady = sorted(seconds[1:])[len(seconds[1:]) // 2]
    return {"first_step_s": seconds[0], "median_step_s": steady, "warmup_s": max(0.0, seconds[0] - steady)}


def finish_stage2(run: Stage2Run, state: LoopState) -> None:
    """Save the model to ``OUT/model`` (collective under FSDP), then on rank 0 ``loss.png``,
    ``summary.json``, the bad-data summary and the final line."""
    elapsed = time.perf_counter() - state.t_start
    distributed_failures.at("end of run: the barrier while rank 0 saves the model")
    model_state, _ = _full_state(run.model, run.args)
    if run.place.main:
        out = run.out
        run.model.save_pretrained(out / "model", state_dict=model_state)
        bad = run.loader.bad_data.as_dict()
        summary = {"steps": state.step, "total_steps": run.plan.total_steps, "seconds": elapsed,
                   "images_per_s": state.images_done / elapsed if elapsed > 0 else None,
                   **step_time_summary(state.step_seconds),
                   "final_loss": state.loss, "trimmed_for_equal_batches": state.trimmed,
                   "bad_data": bad, "model": str(out / "model")}
        closing = [run.loader.bad_data.summary()] if bad.get("bad") else []
        closing.append(f"{state.step} steps in {elapsed:.1f}s; model saved to {out / 'model'}")
        finish_run(out, plot_title="stage 2 loss", summary=summary, say=_say, final_lines=closing)
    barrier()


def run(args: argparse.Namespace) -> int:
    """Train; returns 0. Raises ValueError/FileNotFoundError with a clear message on bad set-up."""
    resolve_recipe(args, STAGE2_RECIPES)
    _check_options(args)
    # --caption's one parse (its syntax, before any data is read; open_train_data resolves its names).
    # args.caption keeps the text: config.json records it as given.
    caption = CaptionMix.parse(args.caption)
    with distributed_run(args.device, timeout_s=args.dist_timeout) as place, locked_out_folder(
            place, args.out, resume=args.resume, overwrite=args.overwrite, say=_say,
            what="a stage2 run") as out:
        # In a function of its own: its model wrappers (DDP, FSDP hold the process group) are gone
        # when the process group is torn down.
        train(args, caption, place, out)
    return 0


def train(args: argparse.Namespace, caption: CaptionMix, place: RunPlace, out: Path) -> None:
    """The run inside its process group and locked ``--out``: set up, train, save (see :func:`run`);
    ``caption`` is ``--caption`` parsed."""
    resolve_batch_size(args, place.world_size)
    data = open_train_data(args, caption)
    model = build_run_model(args, data, place.device)
    setup = configure_step(args, model, place.device, place.world_size)
    plan = plan_steps(args, len(data.source), place.world_size)
    loader = build_train_loader(args, data, model, place)
    opt = build_optimisation(args, model, plan, place, setup)
    config = stage2_config(args, plan, data, place.world_size)
    start = start_or_resume(out, resume=args.resume, config=config, must_match=RESUME_MUST_MATCH,
                            say=_say)
    restore_from_checkpoint(start, args, model, opt, loader, place)
    prepare_out_folder(place, out, resume=args.resume, overwrite=args.overwrite, say=_say)
    if place.main:
        write_run_config(out, {**config, "model": model.config.to_dict(), "step": setup.as_dict()})
        for line in setup.summary_lines():
            _say(line)
    stage2 = Stage2Run(args, place, out, data, model, loader, opt, plan, config, start,
                       autocast_factory(args.precision, place.device))
    with open_run_log(place, out, start=start, report_to=args.report_to, config=config,
                      total_steps=plan.total_steps, unit_name="images", desc="stage2",
                      progress=not args.no_progress) as (log, progress):
        state = train_loop(stage2, log, progress)
    finish_stage2(stage2, state)


__all__ = ["add_arguments", "run", "train_step"]
