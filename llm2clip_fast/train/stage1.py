"""Stage 1: caption-contrastive LoRA fine-tuning of the LLM (``python -m llm2clip_fast.train stage1``).

The LLM gets bidirectional attention and mean pooling
(:class:`~llm2clip_fast.models.llm_encoder.LLMTextEncoder`) and LoRA adapters on its attention and
MLP projections. Each batch holds ``B`` images' caption pairs: the short and the long caption of one
image are positives (which one is the query is drawn per pair), every other caption of the global
batch is a negative; the loss is the fused symmetric ``clip_loss`` or a one-directional InfoNCE at a
fixed (default 50) or learnable scale. An optional MNTP warm-up (llm2vec) runs first. Under
``torchrun`` every rank embeds its share of the batch, features are all-gathered with autograd
(negatives span all ranks) and the LoRA gradients are averaged across ranks.

Outputs in ``--out``: ``adapter/`` (peft LoRA adapter), ``merged/`` (full weights +
``llm2clip_encoder.json``: ``LLMTextEncoder.from_pretrained(out/merged)`` loads it directly),
``log.jsonl`` (loss, lr, captions/s per step), ``loss.png``, ``cra.json`` (caption retrieval accuracy
before and after), ``config.json`` and ``checkpoints/`` (atomic; ``--resume`` continues exactly).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import random
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist_helpers
from ..atomic_files import replace_dir, write_json_atomic
from ..data.bad_data import DEFAULT_MAX_FRACTION, BadSampleError
from ..data.caption_source import CaptionSource
from ..data.loader import build_loader, sample_rng
from ..data.sources import open_source
from ..models.prompt_templates import TEMPLATE_CHOICES
from . import distributed_failures
from .checkpoint import checkpoint_dir, latest_checkpoint, restore_rng_state, save_checkpoint
from .cli.device_flags import add_device_argument, add_precision_argument
from .cli.flag_aliases import add_hidden_switch_alias
from .cli.recipes import mark_recipe_defaults, resolve_recipe
from .cra import caption_pairs, encoder_cra
from .hard_negative_loss import hard_negative_nll_loss
from .holdout import split_holdout
from .mntp import mask_captions, mask_token_id, mntp_loss
from .mntp_phase import contrastive_phase_args, run_mntp_phase
from .non_finite import NonFiniteTrainingError  # noqa: F401 - stage1.NonFiniteTrainingError, what it raises
from .optim import SCHEDULES, adamw_param_groups, build_scheduler
from .run_log import JsonlLog, TrainProgress
from .run_spine import (
    RESOLVED_PATHS,
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
from .trainable_encoder import TrainableEncoder, build_trainable_encoder
from .training_loop import LoopRules, MicroBatches, StepDone, StepWork, accumulate_separately, run_steps

logger = logging.getLogger(__name__)

LOSSES = ("clip", "infonce", "hardneg")
MAX_LOGIT_SCALE = 100.0
# Options that must match when resuming: they define the model, the data order or the schedule.
def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint config of before ``--precision``: its ``bf16_autocast`` switch as the precision it
    meant (on: ``auto``, bf16 autocast on CUDA; off: ``fp32``), so resuming it in another precision is
    refused like any other changed must-match option."""
    if "precision" not in saved and "bf16_autocast" in saved:
        saved["precision"] = "auto" if saved["bf16_autocast"] else "fp32"
    return saved


_RESUME_MUST_MATCH = ("llm", "data", "short_caption", "long_caption", "batch_size", "grad_accum", "steps",
                      "epochs", "mntp_steps", "lora_r", "lora_alpha", "lora_targets", "loss", "scale",
                      "learn_scale", "seed", "lr", "schedule", "warmup_steps", "load_in_8bit", "max_length",
                      "instruction", "pooling", "eval_fraction", "template", "query_instruction_short",
                      "query_instruction_long", "hard_negative_caption", "mntp_data", "precision", "lora",
                      "doc_max_length", "hard_negative_other_image", "data_weights")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stage1`` command-line options."""
    _add_model_arguments(parser)
    _add_data_arguments(parser)
    _add_optimisation_arguments(parser)
    _add_run_arguments(parser)
    mark_recipe_defaults(parser)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The LLM, its LoRA adapters and how captions are encoded."""
    g = parser.add_argument_group("model")
    g.add_argument("--llm", required=True, help="model folder (or a hub name already in the local cache)")
    g.add_argument("--lora", default=None, metavar="A[,B,...]",
                   help="peft adapter folders merged into --llm in order before the new LoRA, as llm2vec's "
                        "from_pretrained merges peft_model_name_or_path and extra_model_name_or_path: the "
                        "official start is Meta-Llama-3-8B-Instruct + McGill's -mntp and -mntp-supervised "
                        "adapters (+ LLM2CLIP's own MNTP adapter)")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default="auto",
                   help="comma-separated linear module names, or 'auto' (q/k/v/o/gate/up/down or the model's "
                        "equivalents)")
    g.add_argument("--load-in-8bit", action="store_true",
                   help="LoRA on an LLM.int8 frozen base (bitsandbytes)")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the frozen LLM's weight dtype (auto: bf16 on CUDA, fp32 on CPU); not the autocast, "
                        "which --precision sets")
    g.add_argument("--gradient-checkpointing", action="store_true")
    # --bf16-autocast / --no-bf16-autocast: the spellings before --precision (on: auto, off: fp32).
    add_hidden_switch_alias(g, "--bf16-autocast", add_precision_argument(
        g, note="the --mntp-data phase runs without it"), on="auto", off="fp32")
    g.add_argument("--pooling", default="mean", choices=("mean", "last_token"))
    g.add_argument("--max-length", type=int, default=512)
    g.add_argument("--doc-max-length", type=int, default=400,
                   help="llm2vec's caption length cap in tokens (longer captions are cut by words; default "
                        "400, llm2vec's; --recipe llm2clip: 512, which with --max-length 512 never cuts, as "
                        "the official training collator does not); saved with the merged encoder")
    g.add_argument("--instruction", default=None,
                   help="prefix attended but not pooled, on both sides (symmetric)")
    g.add_argument("--query-instruction-short", default=None,
                   help="instruction on the query when the short caption is the query (short -> long); "
                        "documents get none, as llm2vec's supervised training")
    g.add_argument("--query-instruction-long", default=None,
                   help="instruction on the query when the long caption is the query (long -> short)")
    g.add_argument("--template", default="auto", choices=TEMPLATE_CHOICES,
                   help="prompt template as llm2vec 0.2.3 wraps texts (default auto: detected from the "
                        "tokenizer and config; saved with the merged encoder)")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The caption pairs, the held-out pairs for CRA, bad-data tolerance."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="caption source (manifest or WebDataset shards)")
    g.add_argument("--short-caption", default="short", help="field of the short caption (default: short)")
    g.add_argument("--long-caption", default="long", help="field of the long caption (default: long)")
    g.add_argument("--hard-negative-caption", default=None,
                   help="field of a hard-negative caption per sample (with --loss hardneg)")
    g.add_argument("--hard-negative-other-image", action="store_true",
                   help="with --loss hardneg: each pair's hard negative is the caption of the positive's "
                        "kind (short or long) of a random other sample, drawn per sample and epoch "
                        "(LLM2CLIP's llm_caption_contrastive/dataset/E5_cc3m.py)")
    g.add_argument("--data-weights", default=None, metavar="W1,W2,...",
                   help="with a ';' --data mix: each global batch comes from one part, drawn by these "
                        "relative weights (default: the parts' sample counts), as the official stage 1 "
                        "batches each dataset of its mixture apart")
    g.add_argument("--eval-data", default=None, help="held-out caption source for CRA")
    g.add_argument("--eval-fraction", type=float, default=0.05,
                   help="without --eval-data: fraction of --data held out for CRA (0 disables CRA)")
    g.add_argument("--eval-size", type=int, default=1000, help="at most this many held-out pairs")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_FRACTION,
                   help="stop when more than this fraction of samples is bad (empty caption; default 1%%), "
                   "checked during each epoch and at its end")


def _add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    """Batch, length, losses, MNTP warm-up, optimizer and schedule."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=512,
                   help="caption pairs per micro-batch over all ranks: the global batch whose other captions "
                        "are each pair's negatives; each rank takes batch-size / world size")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (a step sees batch-size x grad-accum pairs; "
                        "negatives stay within each micro-batch)")
    g.add_argument("--steps", type=int, default=None, help="contrastive optimizer steps (default: --epochs)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--mntp-steps", type=int, default=0,
                   help="MNTP warm-up steps before the contrastive phase")
    g.add_argument("--mntp-probability", type=float, default=0.2)
    g.add_argument("--mntp-data", default=None,
                   help="plain text for MNTP as its own phase (a .txt file, one passage per line, or a "
                        "text-only manifest): --mntp-steps on it, its LoRA merged before the contrastive "
                        "phase (without it, MNTP warms up on the captions with the contrastive LoRA)")
    g.add_argument("--loss", default="clip", choices=LOSSES,
                   help="clip: fused symmetric InfoNCE; infonce: query -> key only; hardneg: llm2vec's "
                        "HardNegativeNLLLoss, query -> all positives and hard negatives of the global batch "
                        "(needs --hard-negative-caption)")
    g.add_argument("--scale", type=float, default=50.0, help="logit scale (1/temperature)")
    g.add_argument("--learn-scale", action="store_true", help="learn the logit scale (init --scale)")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--min-lr-ratio", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=0)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The run folder, checkpoints, resume, logging."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder")
    add_device_argument(g)
    add_distributed_arguments(g)
    g.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N optimizer steps (0: only after the last step)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest usable checkpoint in --out (an error if there is none)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete what --out holds and start over (without it, a non-empty --out is an error)")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_report_to_argument(g)


@dataclass
class Stage1Result:
    """What a run leaves behind (the in-memory encoder has its adapter merged)."""

    out: Path
    encoder: Any
    cra_before: float | None
    cra_after: float | None
    steps: int
    losses: list[float] = field(default_factory=list)


def _fail(message: str) -> None:
    raise ValueError(message)


def check_options(args: argparse.Namespace, world_size: int = 1) -> None:
    """Reject bad options before anything is loaded; messages name the option."""
    resolve_recipe(args)
    check_report_to(args.report_to)
    if args.batch_size < 2:
        _fail("--batch-size must be >= 2: the other captions of the batch are the negatives "
              f"(got {args.batch_size})")
    if args.batch_size % world_size:
        _fail(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world_size})")
    for name in ("grad_accum", "lora_r", "log_every", "max_length", "eval_size"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("mntp_steps", "warmup_steps", "num_workers", "seed", "keep_checkpoints", "save_every"):
        if getattr(args, name) < 0:
            _fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        _fail(f"--steps must be >= 1, got {args.steps}")
    if args.epochs <= 0:
        _fail(f"--epochs must be > 0, got {args.epochs}")
    if not 0.0 <= args.lora_dropout < 1.0:
        _fail(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_alpha <= 0 or args.lr <= 0:
        _fail("--lora-alpha and --lr must be > 0")
    for name in ("lr", "lora_alpha", "scale", "weight_decay", "max_grad_norm", "epochs"):
        if not math.isfinite(getattr(args, name)):
            _fail(f"--{name.replace('_', '-')} must be finite, got {getattr(args, name)}")
    if args.max_grad_norm < 0:
        _fail(f"--max-grad-norm must be >= 0 (0: no clipping), got {args.max_grad_norm}")
    if not 0 < args.scale <= MAX_LOGIT_SCALE:
        _fail(f"--scale must be in (0, {MAX_LOGIT_SCALE:g}], got {args.scale}")
    if not 0.0 <= args.eval_fraction < 1.0:
        _fail(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    query_instr = args.query_instruction_short is not None or args.query_instruction_long is not None
    if query_instr and args.instruction:
        _fail("--instruction (both sides) and --query-instruction-short/-long (query side only) exclude "
              "each other")
    other = getattr(args, "hard_negative_other_image", False)
    if other and args.hard_negative_caption is not None:
        _fail("--hard-negative-caption and --hard-negative-other-image exclude each other (one hard negative "
              "per pair)")
    if (args.loss == "hardneg") != (args.hard_negative_caption is not None or other):
        _fail("--loss hardneg and a hard negative (--hard-negative-caption or --hard-negative-other-image) "
              "go together (the loss scores each query against the batch's positives and hard negatives)")
    if getattr(args, "lora", None) and args.load_in_8bit:
        _fail("--lora merges adapters into the base weights, which an LLM.int8 base cannot take: drop "
              "--load-in-8bit (or merge the adapters into a full-precision folder first)")
    doc_max = getattr(args, "doc_max_length", 400)
    if isinstance(doc_max, bool) or not isinstance(doc_max, int) or doc_max < 1:
        _fail(f"--doc-max-length must be a positive int, got {doc_max!r}")
    if args.hard_negative_caption in (args.short_caption, args.long_caption):
        _fail(f"--hard-negative-caption must differ from the short and long captions "
              f"(got {args.hard_negative_caption!r})")
    if args.short_caption == args.long_caption:
        _fail(f"--short-caption and --long-caption must differ (both {args.short_caption!r})")
    if args.mntp_data and not args.mntp_steps:
        _fail("--mntp-data needs --mntp-steps N (the MNTP phase's optimizer steps)")
    if args.mntp_steps and not 0.0 < args.mntp_probability < 1.0:
        _fail(f"--mntp-probability must be in (0, 1), got {args.mntp_probability}")
    if args.load_in_8bit and importlib.util.find_spec("bitsandbytes") is None:
        _fail("--load-in-8bit needs bitsandbytes: pip install 'llm2clip_fast[int8]'")
    if importlib.util.find_spec("peft") is None:
        _fail("stage 1 trains LoRA adapters with peft: pip install 'llm2clip_fast[lora]'")


# ---------------------------------------------------------------------------------------------
# data


def _open_captions(spec: str, short: str, long: str, what: str, hard: str | None = None,
                   weights: str | None = None) -> CaptionSource:
    names = [short, long] + ([hard] if hard else [])
    try:
        source = open_source(spec, caption_columns=names, require_images=False, mix_weights=weights)
    except ValueError as exc:
        raise ValueError(f"{what} {spec!r}: {exc} (set --short-caption / --long-caption"
                         f"{' / --hard-negative-caption' if hard else ''})") from exc
    missing = [n for n in names if n not in source.caption_names]
    if missing:
        raise ValueError(f"{what} {spec!r} has no caption field(s) {missing}; it has {source.caption_names} "
                         "(set --short-caption / --long-caption)")
    return source


def _batch_pairs(batch: dict[str, Any], args: argparse.Namespace,
                 epoch: int) -> tuple[list[str], list[str], torch.Tensor]:
    shorts = [c[args.short_caption] for c in batch["all_captions"]]
    longs = [c[args.long_caption] for c in batch["all_captions"]]
    # Which caption is the query: drawn per pair, a function of (seed, epoch, key) only.
    flip = torch.tensor([sample_rng(args.seed, epoch, k, "direction").random() < 0.5 for k in batch["keys"]])
    return shorts, longs, flip


# ---------------------------------------------------------------------------------------------
# model


class LogitScale(nn.Module):
    """The contrastive scale s: fixed, or learned as ``exp(t)`` with ``s <= 100`` (CLIP's clamp)."""

    def __init__(self, init: float, learnable: bool) -> None:
        super().__init__()
        self.learnable = learnable
        self.fixed = float(init)
        if learnable:
            self.log_scale = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor | float:
        if not self.learnable:
            return self.fixed
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


# ---------------------------------------------------------------------------------------------
# losses


def contrastive_loss(query: torch.Tensor, key: torch.Tensor, scale: torch.Tensor | float,
                     kind: str) -> torch.Tensor:
    """Loss of this rank's (B, H) query/key embeddings (row i pairs with row i); L2-normalised here.

    clip: the fused symmetric ``clip_loss``; infonce: cross-entropy of each query over all keys.
    Under torch.distributed the negatives are every rank's keys and each rank returns the mean over
    its own rows (OpenCLIP's local-loss convention): averaging the parameter gradients over ranks
    then gives the gradient of the global-batch loss.
    """
    from ..ops.clip_loss import clip_loss

    q = F.normalize(query.float(), dim=-1)
    k = F.normalize(key.float(), dim=-1)
    distributed = dist_helpers.get_world_size() > 1
    if kind == "clip":
        return clip_loss(q, k, scale, distributed=True) if distributed else clip_loss(q, k, scale)
    offset = 0
    if distributed:
        k, offset = dist_helpers.gather_rows_with_grad(
            k, equal_sizes_for="--loss infonce (use --loss clip, which handles the unequal batches bad "
                               "samples leave)")
    logits = (q @ k.t()) * scale
    return F.cross_entropy(logits, offset + torch.arange(q.shape[0], device=q.device))


def _document_instructions(args: argparse.Namespace, n: int) -> list[str | None] | None:
    """None (the encoder's own, symmetric ``--instruction``) or no instruction at all when the
    instructions are query-side only."""
    query_side = args.query_instruction_short is not None or args.query_instruction_long is not None
    return [None] * n if query_side else None


def _embed(encoder: Any, texts: list[str], instructions: list[str | None] | None) -> torch.Tensor:
    enc = encoder.tokenize(texts, instructions=instructions)
    return encoder(enc["input_ids"], enc["attention_mask"], enc["embed_mask"])


def _embed_pairs(encoder: Any, shorts: list[str], longs: list[str], flip: torch.Tensor,
                 args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) embeddings of a batch of caption pairs; ``flip[i]``: the long caption is the query.

    Symmetric (``--instruction`` or none): both captions embedded alike. Query-side instructions
    (llm2vec's supervised recipe): the query gets its direction's instruction, the document none.
    """
    docs = _document_instructions(args, len(shorts))
    if docs is None:
        emb_s = _embed(encoder, shorts, None)
        emb_l = _embed(encoder, longs, None)
        f = flip.to(emb_s.device)[:, None]
        return torch.where(f, emb_l, emb_s), torch.where(f, emb_s, emb_l)
    flips = flip.tolist()
    queries = [lg if fl else sh for sh, lg, fl in zip(shorts, longs, flips)]
    documents = [sh if fl else lg for sh, lg, fl in zip(shorts, longs, flips)]
    instructions = [args.query_instruction_long if fl else args.query_instruction_short for fl in flips]
    return _embed(encoder, queries, instructions), _embed(encoder, documents, docs)


# ---------------------------------------------------------------------------------------------
# files


def stage1_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options as each checkpoint records them: the plain (scalar) resolved options, sorted,
    and where the path options lead (``resolved_paths``)."""
    plain = (str, int, float, bool, type(None))
    options = options_config(args)
    config = {k: v for k, v in sorted(options.items()) if isinstance(v, plain)}
    if RESOLVED_PATHS in options:  # where --llm, --data, ... lead, compared on --resume
        config[RESOLVED_PATHS] = options[RESOLVED_PATHS]
    return config


# ---------------------------------------------------------------------------------------------
# training


def _micro_batches(loader: Any, epoch: int, start_batch: int,
                   usable: int) -> Iterator[tuple[dict[str, Any], int]]:
    """(batch, epoch) forever: ``usable`` batch slots per epoch, starting at ``start_batch`` of ``epoch``."""
    while True:
        if start_batch < usable:
            loader.set_epoch(epoch, start_batch)
            for batch in loader:
                if batch["batch_index"] >= usable:
                    break
                yield batch, epoch
            loader.bad_data.check_end_of_epoch()
        epoch += 1
        start_batch = 0


def _say(message: str) -> None:
    # Rank 0 only: the command line's handler drops other ranks' info lines.
    logger.info("stage1: %s", message)


def train_stage1(args: argparse.Namespace) -> Stage1Result:
    """Run stage 1 as configured by ``args`` (see :func:`add_arguments`)."""
    with warnings.catch_warnings():
        # bitsandbytes warns on every int8 matmul that fp32 activations are cast to fp16.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        with distributed_run(args.device, timeout_s=args.dist_timeout) as place:
            resolve_recipe(args)
            check_options(args, place.world_size)
            with locked_out_folder(place, args.out, resume=args.resume, overwrite=args.overwrite, say=_say,
                                   what="a stage1 run") as out:
                return _train_stage1(args, place, out)


# ---------------------------------------------------------------------------------------------
# the run, step by step


def open_pair_data(args: argparse.Namespace) -> tuple[CaptionSource, list[tuple[str, str]]]:
    """The training captions (``--data``) and the held-out (short, long) pairs CRA is measured on:
    ``--eval-data``, or ``--eval-fraction`` of ``--data`` held out (not for streamed data)."""
    source = _open_captions(args.data, args.short_caption, args.long_caption, "--data",
                            hard=args.hard_negative_caption, weights=getattr(args, "data_weights", None))
    eval_pairs: list[tuple[str, str]] = []
    if args.eval_data:
        eval_source = _open_captions(args.eval_data, args.short_caption, args.long_caption, "--eval-data")
        eval_pairs = caption_pairs(eval_source, args.short_caption, args.long_caption, limit=args.eval_size)
    elif args.eval_fraction > 0:
        if getattr(source, "streaming", False):
            raise ValueError(f"--eval-fraction {args.eval_fraction} holds samples out by random access, "
                             f"which the streamed --data {args.data!r} lacks: pass a held-out set with "
                             "--eval-data, or --eval-fraction 0")
        source, eval_source = split_holdout(source, args.eval_fraction, seed=args.seed,
                                            max_heldout=args.eval_size)
        eval_pairs = caption_pairs(eval_source, args.short_caption, args.long_caption)
    return source, eval_pairs


@dataclass(frozen=True)
class Stage1Plan:
    """How long the run is: batch slots used per epoch, contrastive steps, all optimizer steps."""

    usable_slots: int
    contrastive_steps: int
    total_steps: int


def build_pair_loader(args: argparse.Namespace, source: CaptionSource, place: RunPlace) -> Any:
    """This rank's caption-only loader: ``--batch-size / world size`` pairs per batch, full batches."""
    return build_loader(source, batch_size=args.batch_size // place.world_size, caption=None,
                        with_images=False, rank=place.rank, world_size=place.world_size, seed=args.seed,
                        num_workers=args.num_workers, drop_last=True, bad_data=args.max_bad_fraction)


def plan_steps(args: argparse.Namespace, source: CaptionSource, loader: Any) -> Stage1Plan:
    """Steps per epoch (whole ``--grad-accum`` groups of batch slots), the contrastive steps
    (``--steps`` or ``--epochs``) and the total with ``--mntp-steps``; an error when an epoch cannot
    fill one step."""
    # A streamed source counts its batches from the shards' sample counts (one counting pass).
    slots = loader.num_batches() if getattr(source, "streaming", False) else len(loader.dataset.batches())
    steps_per_epoch = slots // args.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"{len(source)} training samples make {slots} batches of {args.batch_size} "
                         "per epoch, "
                         f"fewer than --grad-accum {args.grad_accum}: lower --batch-size")
    contrastive_steps = args.steps if args.steps is not None else max(1, round(args.epochs * steps_per_epoch))
    return Stage1Plan(usable_slots=steps_per_epoch * args.grad_accum, contrastive_steps=contrastive_steps,
                      total_steps=args.mntp_steps + contrastive_steps)


def run_separate_mntp_phase(args: argparse.Namespace, place: RunPlace, out: Path,
                            plan: Stage1Plan) -> tuple[argparse.Namespace, Stage1Plan]:
    """With ``--mntp-data``: MNTP as its own phase (llm2vec's recipe), its LoRA merged into the base
    the contrastive phase then trains a fresh LoRA on. Returns the contrastive phase's options and
    plan. It writes into ``--out``, so the folder is made ready (and, with ``--overwrite``, emptied)
    first; its ``mntp/`` folder is then this run's own, not a stale one."""
    prepare_out_folder(place, out, resume=args.resume, overwrite=args.overwrite, say=_say)
    dist_helpers.barrier()
    mntp_base = run_mntp_phase(args, place.device, out, logger.info)
    return contrastive_phase_args(args, mntp_base), replace(plan, total_steps=plan.contrastive_steps)


@dataclass
class Stage1Training:
    """What the steps train: the LoRA-wrapped encoder, the logit scale, the optimizer and schedule."""

    built: TrainableEncoder
    scale_module: LogitScale
    named_trainable: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: Any

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable]


def build_training(args: argparse.Namespace, place: RunPlace, total_steps: int) -> Stage1Training:
    """Load the LLM with LoRA (:func:`build_trainable_encoder`), the logit scale, AdamW over the LoRA
    weights (and a learned scale) and the warmup + ``--schedule`` lr schedule."""
    built = build_trainable_encoder(args, place.device)
    scale_module = LogitScale(args.scale, args.learn_scale).to(place.device)
    named = [(f"lora.{n}", p) for n, p in built.peft_model.named_parameters() if p.requires_grad]
    named += [(f"scale.{n}", p) for n, p in scale_module.named_parameters()]
    optimizer = torch.optim.AdamW(adamw_param_groups(named, args.weight_decay, lr=args.lr))
    scheduler = build_scheduler(optimizer, args.schedule, warmup_steps=args.warmup_steps,
                                total_steps=total_steps, min_lr_ratio=args.min_lr_ratio)
    return Stage1Training(built, scale_module, named, optimizer, scheduler)


def restore_from_checkpoint(start: RunStart, training: Stage1Training) -> float | None:
    """Continue where the checkpoint stopped (trainable tensors, optimizer, schedule, RNG streams);
    returns the CRA it measured before training (None for a fresh run or when it measured none)."""
    ckpt = start.checkpoint
    if ckpt is None:
        return None
    state = dict(training.named_trainable)
    missing = sorted(set(state) - set(ckpt.model_state))
    if missing:
        raise ValueError(f"checkpoint {ckpt.path} lacks trainable tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, p in state.items():
            p.copy_(ckpt.model_state[name].to(p.device, p.dtype))
    training.optimizer.load_state_dict(ckpt.optimizer_state)
    training.scheduler.load_state_dict(ckpt.scheduler_state)
    restore_rng_state(ckpt.rng)
    return ckpt.extra.get("cra_before")


@dataclass
class Stage1Run:
    """Everything the training loop works with, set up by :func:`_train_stage1`."""

    args: argparse.Namespace
    place: RunPlace
    out: Path
    loader: Any
    plan: Stage1Plan
    training: Stage1Training
    config: dict[str, Any]
    start: RunStart
    autocast: Any
    eval_pairs: list[tuple[str, str]]
    cra_before: float | None = None
    mask_id: int = -1
    special_ids: set[int] = field(default_factory=set)
    source: Any = None  # the training captions (--hard-negative-other-image draws from them)


@dataclass
class Stage1LoopState:
    """Where the loop is: optimizer steps done, the epoch of the last batch, the per-step losses and
    the captions seen (all ranks)."""

    step: int
    epoch: int
    losses: list[float] = field(default_factory=list)
    captions: int = 0
    t_start: float = field(default_factory=time.perf_counter)


def write_stage1_config(run: Stage1Run, source_size: int) -> None:
    """Make ``--out`` ready and write ``config.json`` (rank 0), then say where the run starts."""
    args, start, world = run.args, run.start, run.place.world_size
    if run.place.main:
        write_run_config(run.out, {**run.config, "lora_targets_resolved": run.training.built.targets,
                                   "settings_from": settings_from(args),
                                   "total_steps": run.plan.total_steps, "world_size": world}, sort_keys=True)
    if start.resumed:
        _say(f"resuming from {start.checkpoint.path} (step {start.step}, epoch {start.epoch}, batch "
             f"{start.batch_index})")
    _say(f"{source_size} training pairs, {len(run.eval_pairs)} held-out, {run.plan.total_steps} steps "
         f"({args.mntp_steps} MNTP), LoRA r={args.lora_r} on {','.join(run.training.built.targets)}")


def measure_cra_before(run: Stage1Run) -> None:
    """On rank 0, unless a resumed checkpoint carries it: caption retrieval accuracy before training."""
    distributed_failures.at("start-up: the barrier while rank 0 measures CRA before training")
    if run.place.main and run.eval_pairs and run.cra_before is None:
        run.cra_before = encoder_cra(run.training.built.encoder, run.eval_pairs)
        _say(f"CRA before training {run.cra_before:.4f} on {len(run.eval_pairs)} pairs")
    dist_helpers.barrier()


def mntp_batch_loss(run: Stage1Run, shorts: list[str], longs: list[str], step: int) -> torch.Tensor:
    """The MNTP warm-up loss of one micro-batch: masked-token prediction over its captions (the mask
    seeded by step and rank)."""
    args, built = run.args, run.training.built
    encoder = built.encoder
    enc = encoder.tokenize(shorts + longs)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + run.place.rank)
    ids, labels = mask_captions(enc["input_ids"], enc["attention_mask"], mask_id=run.mask_id,
                                special_ids=run.special_ids, probability=args.mntp_probability, generator=gen,
                                decoder=built.decoder)
    out_h = built.peft_model(input_ids=ids.to(encoder.device),
                             attention_mask=enc["attention_mask"].to(encoder.device))
    return mntp_loss(out_h.last_hidden_state, labels.to(encoder.device), built.head, decoder=built.decoder)


def other_image_negatives(source: CaptionSource, keys: list[str], flips: list[bool],
                          args: argparse.Namespace, epoch: int) -> list[str]:
    """One hard negative per pair, as LLM2CLIP's ``E5Data.get_cc3m`` (microsoft/LLM2CLIP
    ``llm_caption_contrastive/dataset/E5_cc3m.py`` at commit cba3b45ba3d9) draws it: a random *other*
    sample of the training data (``rand_index != i``) and its caption of the positive's kind (the long
    one when the short caption is the query, else the short one). The draw is seeded by (seed, epoch,
    key), so a resumed run draws the same; a drawn sample with an empty caption is passed over."""
    out = []
    for key, long_query in zip(keys, flips, strict=True):
        rng = sample_rng(args.seed, epoch, key, "other-image negative")
        for _ in range(1000):
            j = rng.randrange(len(source))
            if source.key_at(j) == key:
                continue
            try:
                captions = source.captions_at(j)
            except BadSampleError:
                continue
            out.append(captions[args.short_caption] if long_query else captions[args.long_caption])
            break
        else:
            raise ValueError(f"--hard-negative-other-image: no other sample with good captions found for "
                             f"{key!r} in {len(source)} samples")
    return out


def contrastive_batch_loss(run: Stage1Run, batch: dict[str, Any], shorts: list[str], longs: list[str],
                           flip: torch.Tensor, epoch: int = 0) -> torch.Tensor:
    """The contrastive loss of one micro-batch's caption pairs (``--loss``; hardneg adds the batch's
    hard-negative captions)."""
    args, encoder, scale = run.args, run.training.built.encoder, run.training.scale_module
    query, key = _embed_pairs(encoder, shorts, longs, flip, args)
    if args.loss == "hardneg":
        if getattr(args, "hard_negative_other_image", False):
            hard = other_image_negatives(run.source, batch["keys"], flip.tolist(), args, epoch)
        else:
            hard = [c[args.hard_negative_caption] for c in batch["all_captions"]]
        negative = _embed(encoder, hard, _document_instructions(args, len(hard)))
        return hard_negative_nll_loss(query, key, negative, scale())
    return contrastive_loss(query, key, scale(), args.loss)


class Stage1Steps:
    """Stage 1 as the training loop (:mod:`.training_loop`) takes it: the MNTP warm-up steps
    (``--mntp-steps``, on the captions) then the contrastive ones, their micro-batches and losses,
    ``log.jsonl``'s fields and the checkpoints."""

    name = "stage 1"

    def __init__(self, run: Stage1Run, state: Stage1LoopState) -> None:
        self.run, self.state = run, state
        self.device, self.out = run.place.device, run.out
        self.trainable = run.training.trainable
        self.hand_synced = self.trainable  # no DDP wrapper: the loop averages every LoRA gradient
        self.optimizer, self.scheduler = run.training.optimizer, run.training.scheduler
        self._batches = _micro_batches(run.loader, run.start.epoch, run.start.batch_index,
                                       run.plan.usable_slots)

    def phase(self, step: int) -> str:
        return "mntp" if step <= self.run.args.mntp_steps else "contrastive"

    def step_label(self, step: int) -> str:
        return f"step {step} ({self.phase(step)})"

    def collectives(self, step: int) -> str:
        return (f"{self.step_label(step)}: the gradient and loss all-reduces"
                + (" and the key all-gather" if self.phase(step) == "contrastive" else ""))

    def next_micro_batch(self) -> tuple[dict[str, Any], int]:
        return next(self._batches)

    def forward_backward(self, micro: MicroBatches) -> StepWork:
        """The step's micro-batches of caption pairs: MNTP or contrastive loss, backward of each."""
        run, state, args = self.run, self.state, self.run.args
        mntp = self.phase(state.step + 1) == "mntp"
        captions = 0

        def loss_of(item: tuple[dict[str, Any], int]) -> torch.Tensor:
            nonlocal captions
            batch, state.epoch = item
            shorts, longs, flip = _batch_pairs(batch, args, state.epoch)
            captions += 2 * len(shorts) * run.place.world_size
            with run.autocast():
                if mntp:
                    return mntp_batch_loss(run, shorts, longs, state.step)
                return contrastive_batch_loss(run, batch, shorts, longs, flip, state.epoch)

        local_loss = accumulate_separately(micro, loss_of)
        return StepWork(dist_helpers.mean_over_ranks(local_loss, self.device), captions)

    def after_update(self) -> None:
        pass

    def finished(self, done: StepDone) -> None:
        self.state.step = done.step
        self.state.losses.append(done.loss)
        self.state.captions += done.units

    def log_fields(self, done: StepDone) -> dict[str, Any]:
        scale_now = self.run.training.scale_module()
        scale_now = float(scale_now.detach()) if isinstance(scale_now, torch.Tensor) else scale_now
        return {"step": done.step, "phase": self.phase(done.step), "loss": done.loss, "lr": done.lr,
                "grad_norm": done.grad_norm, "scale": float(scale_now), "epoch": self.state.epoch,
                "captions_per_s": done.rate, "step_time_s": done.seconds}

    def save_checkpoint(self, step: int) -> Path:
        save_run_checkpoint(self.run, step)
        return checkpoint_dir(self.out, step)

    def last_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out)

    def before_final_checkpoint(self) -> None:
        self.run.loader.bad_data.check_end_of_epoch()  # a run shorter than an epoch: what it saw

    def preempted(self, step: int, total: int, checkpoint: Any) -> Exception:
        return preempted(step, total, checkpoint)


def save_run_checkpoint(run: Stage1Run, step: int) -> None:
    """Checkpoint the trainable tensors, optimizer, schedule and data position (rank 0 writes)."""
    distributed_failures.at(f"checkpoint at step {step}: the barrier while rank 0 writes it")
    if run.place.main:
        training, loader = run.training, run.loader
        save_checkpoint(run.out, step=step, epoch=loader.epoch, batch_index=loader.next_batch,
                        model_state={n: p for n, p in training.named_trainable}, optimizer=training.optimizer,
                        scheduler=training.scheduler, config=run.config, keep_last=run.args.keep_checkpoints,
                        run_id=run.start.run_id,
                        extra={"cra_before": run.cra_before} if run.cra_before is not None else {})
    dist_helpers.barrier()


def loop_rules(args: argparse.Namespace, total_steps: int) -> LoopRules:
    """Stage 1's options as the training loop's rules."""
    return LoopRules(total_steps=total_steps, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
                     log_every=args.log_every, save_every=args.save_every)


def train_loop(run: Stage1Run, log: JsonlLog, progress: TrainProgress) -> Stage1LoopState:
    """The plan's optimizer steps (MNTP warm-up steps first) under the training loop's rules
    (:mod:`.training_loop`: step 1, every ``--log-every`` and the last logged; a checkpoint every
    ``--save-every`` steps and after the last; SIGTERM and a lost lock stop at a step boundary)."""
    state = Stage1LoopState(step=run.start.step, epoch=run.start.epoch)
    run.training.built.peft_model.train()
    rules = loop_rules(run.args, run.plan.total_steps)
    run_steps(Stage1Steps(run, state), rules, run.start.step, log, progress)
    return state


def finish_stage1(run: Stage1Run, state: Stage1LoopState) -> Stage1Result:
    """On rank 0: CRA after training (``cra.json``), ``adapter/`` and ``merged/``, then ``loss.png``,
    ``summary.json`` and the closing line."""
    args, out = run.args, run.out
    elapsed = time.perf_counter() - state.t_start
    distributed_failures.at("end of run: the barrier while rank 0 measures CRA and saves the adapter and the "
                            "merged model")
    cra_after = None
    merged_encoder = None
    if run.place.main:
        if run.eval_pairs:
            cra_after = encoder_cra(run.training.built.encoder, run.eval_pairs)
            _say(f"CRA after training {cra_after:.4f} (before {run.cra_before:.4f})")
            write_json_atomic(out / "cra.json", {"before": run.cra_before, "after": cra_after,
                                                 "pairs": len(run.eval_pairs), "steps": run.plan.total_steps},
                              sort_keys=True)
        merged_encoder = _save_outputs(args, run.training.built, out, run.place.device)
        summary = {"steps": state.step, "total_steps": run.plan.total_steps, "seconds": elapsed,
                   "captions_per_s": state.captions / elapsed if elapsed > 0 and state.captions else None,
                   "final_loss": state.losses[-1] if state.losses else None, "cra_before": run.cra_before,
                   "cra_after": cra_after, "bad_data": run.loader.bad_data.as_dict(),
                   "adapter": str(out / "adapter"), "merged": str(out / "merged")}
        finish_run(out, plot_title="stage 1", summary=summary, say=_say,
                   final_lines=[f"adapter in {out / 'adapter'}, merged model in {out / 'merged'}"])
    dist_helpers.barrier()
    return Stage1Result(out, merged_encoder, run.cra_before, cra_after, state.step, state.losses)


def _train_stage1(args: argparse.Namespace, place: RunPlace, out: Path) -> Stage1Result:
    run_config = stage1_config(args)
    # Data first: a missing caption field should fail before a large model loads.
    source, eval_pairs = open_pair_data(args)
    loader = build_pair_loader(args, source, place)
    plan = plan_steps(args, source, loader)
    random.seed(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 - seeding the global stream libraries draw from
    if args.mntp_data:
        args, plan = run_separate_mntp_phase(args, place, out, plan)
    training = build_training(args, place, plan.total_steps)
    torch.manual_seed(args.seed + place.rank)  # dropout streams differ per rank
    start = start_or_resume(out, resume=args.resume, config=run_config, must_match=_RESUME_MUST_MATCH,
                            say=_say, upgrade_saved=upgrade_saved_config)
    encoder = training.built.encoder
    run = Stage1Run(args, place, out, loader, plan, training, run_config, start,
                    autocast_factory(args.precision, place.device), eval_pairs,
                    cra_before=restore_from_checkpoint(start, training),
                    mask_id=mask_token_id(encoder.tokenizer) if args.mntp_steps else -1,
                    special_ids=set(getattr(encoder.tokenizer, "all_special_ids", []) or []),
                    source=source)
    if not args.mntp_data:  # the MNTP phase made the folder ready already
        prepare_out_folder(place, out, resume=args.resume, overwrite=args.overwrite, say=_say)
    write_stage1_config(run, len(source))
    measure_cra_before(run)
    with open_run_log(place, out, start=start, report_to=args.report_to, config=run_config,
                      total_steps=plan.total_steps, unit_name="captions", desc="stage1",
                      progress=not args.quiet) as (log, progress):
        state = train_loop(run, log, progress)
    return finish_stage1(run, state)


def _save_outputs(args: argparse.Namespace, built: TrainableEncoder, out: Path, device: torch.device) -> Any:
    """Write ``adapter/`` and ``merged/`` atomically; returns the merged in-memory encoder (an 8-bit
    base is merged into a reload on the run's ``device``)."""
    from ..models.llm_encoder import LLMTextEncoder

    tmp = out / f".tmp-adapter-{uuid.uuid4().hex[:8]}"
    built.peft_model.save_pretrained(str(tmp))
    replace_dir(tmp, out / "adapter")

    encoder = built.encoder
    if args.load_in_8bit:
        # Merging into int8 weights would round the update away: merge into a full-precision reload.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        encoder = LLMTextEncoder.from_pretrained(built.folder, dtype=dtype, device=device,
                                                 lora=out / "adapter", merge_lora=True, pooling=args.pooling,
                                                 max_length=args.max_length,
                                                 instruction=args.instruction or "",
                                                 bidirectional=True, template=built.encoder.template,
                                                 doc_max_length=getattr(args, "doc_max_length", 400))
    else:
        if args.gradient_checkpointing:
            encoder.model.get_base_model().gradient_checkpointing_disable()
        encoder.merge_lora()
    encoder.model.eval()
    if hasattr(encoder.model.config, "use_cache") and built.decoder:
        encoder.model.config.use_cache = True
    tmp = out / f".tmp-merged-{uuid.uuid4().hex[:8]}"
    encoder.save_pretrained(tmp)
    replace_dir(tmp, out / "merged")
    return encoder


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m llm2clip_fast.train stage1``."""
    train_stage1(args)
    return 0
