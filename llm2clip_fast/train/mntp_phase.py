"""Stage 1's MNTP phase on plain text (``--mntp-data``), merged before the contrastive phase.

LLM2CLIP mixes plain text (Wikitext-103) into stage 1 to keep the LLM's distribution, and the
official llm2vec recipe trains masked next-token prediction as its own run: a LoRA trained with
MNTP, merged into the weights, then a fresh LoRA for the contrastive phase. :func:`run_mntp_phase`
does exactly that inside one ``stage1`` command: ``--mntp-steps`` optimizer steps of MNTP on the
``--mntp-data`` passages (same LoRA shape, lr, schedule and clipping as the run), then the adapter
is merged and the merged model saved to ``<out>/mntp/merged``, which the contrastive phase loads as
its base. A finished phase is reused by ``--resume`` (and by a rerun); an interrupted one restarts
(it saves no checkpoints: asked to stop, by SIGTERM or a lost folder lock, its ranks stop after the
same step and say so). Its steps follow the one training loop's rules (:mod:`.training_loop`); the
logged ones (step 1, every ``--log-every``, the last) go to ``<out>/mntp/log.jsonl``.

``--mntp-data``: a ``.txt`` file (one passage per non-empty line) or a manifest / shard spec whose
caption fields are the passages (text-only manifests are fine).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist_helpers
from ..atomic_files import replace_dir
from . import distributed_failures
from .run_log import JsonlLog
from .stop_requests import RunPreempted
from .training_loop import LoopRules, MicroBatches, StepDone, StepWork, accumulate_separately, run_steps

MNTP_DIR = "mntp"
MNTP_LOG_NAME = "log.jsonl"  # in MNTP_DIR: the phase's logged steps, as the run's own log.jsonl


def read_mntp_texts(spec: str) -> list[str]:
    """The passages of ``--mntp-data``; raises ``ValueError`` naming the file when it holds none."""
    if str(spec).lower().endswith(".txt"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--mntp-data {spec!r} is not a file")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        from ..data.sources import open_source

        try:
            source = open_source(spec, require_images=False)
        except ValueError as exc:
            raise ValueError(f"--mntp-data {spec!r}: {exc}") from exc
        texts = [t.strip() for _, caps in source.iter_captions() for t in caps.values()]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"--mntp-data {spec!r} holds no non-empty passage")
    return texts


def _text_batches(texts: list[str], per_rank: int, seed: int, rank: int, world: int) -> Iterator[list[str]]:
    """This rank's share of a global batch of ``per_rank * world`` passages, reshuffled every epoch."""
    global_batch = per_rank * world
    epoch = 0
    while True:
        order = list(range(len(texts)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        for start in range(0, len(order) - global_batch + 1, global_batch):
            rows = order[start + rank * per_rank: start + (rank + 1) * per_rank]
            yield [texts[i] for i in rows]
        epoch += 1


def _save_merged(args: argparse.Namespace, built: Any, final: Path, device: torch.device) -> None:
    """Save the MNTP adapter, then the base with it merged (into a full-precision reload on ``device``
    when the base was loaded 8-bit: merging into int8 weights would round the update away)."""
    from ..models.llm_encoder import LLMTextEncoder

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-adapter-{uuid.uuid4().hex[:8]}"
    built.peft_model.save_pretrained(str(tmp))
    replace_dir(tmp, final.parent / "adapter")
    if args.load_in_8bit:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        encoder = LLMTextEncoder.from_pretrained(built.folder, dtype=dtype, device=device,
                                                 lora=final.parent / "adapter",
                                                 merge_lora=True, max_length=args.max_length, instruction="",
                                                 bidirectional=True, template=built.encoder.template)
    else:
        if args.gradient_checkpointing:
            built.peft_model.get_base_model().gradient_checkpointing_disable()
        encoder = built.encoder
        encoder.merge_lora()
    encoder.model.eval()
    if hasattr(encoder.model.config, "use_cache") and built.decoder:
        encoder.model.config.use_cache = True
    tmp = final.parent / f".tmp-merged-{uuid.uuid4().hex[:8]}"
    encoder.save_pretrained(tmp)
    replace_dir(tmp, final)


def contrastive_phase_args(args: argparse.Namespace, mntp_base: Path) -> argparse.Namespace:
    """The run's options for the contrastive phase: the MNTP-merged model as base, no MNTP steps."""
    out = copy.copy(args)
    out.llm = str(mntp_base)
    out.mntp_steps = 0
    out.lora = None  # the --lora chain is merged into the MNTP base already
    return out


def mntp_merged_dir(out: str | os.PathLike) -> Path:
    return Path(out) / MNTP_DIR / "merged"


def run_mntp_phase(args: argparse.Namespace, device: torch.device, out: Path,
                   say: Callable[[str], None]) -> Path:
    """Train, merge and save the MNTP LoRA; returns the merged model folder (reused when finished)."""
    from ..models.llm_encoder import ENCODER_CONFIG_NAME

    final = mntp_merged_dir(out)
    if (final / ENCODER_CONFIG_NAME).is_file():
        say(f"stage1: MNTP phase already done, reusing {final}")
        return final
    rank, world = dist_helpers.get_rank(), dist_helpers.get_world_size()
    texts = _read_batchable_texts(args, world)
    training = _build_mntp_training(args, device)
    batches = _text_batches(texts, args.batch_size // world, args.seed, rank, world)
    say(f"stage1: MNTP phase, {args.mntp_steps} steps on {len(texts)} passages of {args.mntp_data}")
    training.built.peft_model.train()
    rules = LoopRules(total_steps=args.mntp_steps, grad_accum=1, max_grad_norm=args.max_grad_norm,
                      log_every=args.log_every, save_every=0)
    with JsonlLog(final.parent / MNTP_LOG_NAME, resume_step=None, enabled=rank == 0) as log:
        run_steps(MntpSteps(args, training, batches, device, out), rules, 0, log)
    distributed_failures.at("MNTP phase end: the barrier while rank 0 merges and saves the MNTP model")
    if rank == 0:
        _save_merged(args, training.built, final, device)
        say(f"stage1: MNTP adapter merged, saved to {final}")
    dist_helpers.barrier()
    del training
    return final


class MntpSteps:
    """The MNTP phase as the training loop (:mod:`.training_loop`) takes it: one batch of passages
    per step (no accumulation), its masked-token loss, ``mntp/log.jsonl``'s fields and no
    checkpoints (asked to stop, the phase stops after the step and saves nothing)."""

    name = "stage 1's MNTP phase"

    def __init__(self, args: argparse.Namespace, training: _MntpTraining, batches: Iterator[list[str]],
                 device: torch.device, out: Path) -> None:
        self.args, self.training, self.device, self.out = args, training, device, out
        self.trainable = self.hand_synced = training.params
        self.optimizer, self.scheduler = training.optimizer, training.scheduler
        self._batches = batches
        self._rank, self._world = dist_helpers.get_rank(), dist_helpers.get_world_size()
        self._steps_done = 0

    def step_label(self, step: int) -> str:
        return f"MNTP step {step}"

    def collectives(self, step: int) -> str:
        return f"MNTP step {step}: the gradient and loss all-reduces"

    def next_micro_batch(self) -> list[str]:
        return next(self._batches)

    def forward_backward(self, micro: MicroBatches) -> StepWork:
        step = self._steps_done + 1  # the mask is seeded by (seed, step, rank)
        units = 0

        def loss_of(texts: list[str]) -> torch.Tensor:
            nonlocal units
            units += len(texts) * self._world
            return _mntp_batch_loss(self.args, self.training, texts, step, self._rank, self.device)

        local_loss = accumulate_separately(micro, loss_of)
        return StepWork(dist_helpers.mean_over_ranks(local_loss, self.device), units)

    def after_update(self) -> None:
        pass

    def finished(self, done: StepDone) -> None:
        self._steps_done = done.step

    def log_fields(self, done: StepDone) -> dict[str, Any]:
        return {"step": done.step, "phase": "mntp", "loss": done.loss, "lr": done.lr,
                "grad_norm": done.grad_norm, "step_time_s": done.seconds}

    def save_checkpoint(self, step: int) -> None:
        return None  # the phase is short; an interrupted one starts again

    def last_checkpoint(self) -> None:
        return None

    def before_final_checkpoint(self) -> None:
        pass

    def preempted(self, step: int, total: int, checkpoint: Any) -> RunPreempted:
        return RunPreempted(f"stopped by SIGTERM after MNTP step {step} of {total}; the MNTP phase saves no "
                            "checkpoints, so --resume starts it again")


def _read_batchable_texts(args: argparse.Namespace, world: int) -> list[str]:
    """The ``--mntp-data`` passages; an error when they cannot fill one global batch."""
    texts = read_mntp_texts(args.mntp_data)
    if len(texts) < (args.batch_size // world) * world:
        raise ValueError(
            f"--mntp-data holds {len(texts)} passages, fewer than one batch of {args.batch_size}")
    return texts


@dataclass
class _MntpTraining:
    """The phase's LoRA-wrapped model (with its token-prediction head), optimizer, schedule and the
    tokenizer's mask and special token ids."""

    built: Any  # stage1.TrainableEncoder
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mask_id: int
    special_ids: set[int]


def _build_mntp_training(args: argparse.Namespace, device: torch.device) -> _MntpTraining:
    """Load the LLM with LoRA and its token-prediction head (``--mntp-steps`` > 0 asks for it), AdamW
    over the LoRA weights and the ``--schedule`` over ``--mntp-steps`` steps, without warm-up."""
    from .mntp import mask_token_id
    from .optim import adamw_param_groups, build_scheduler
    from .trainable_encoder import build_trainable_encoder

    built = build_trainable_encoder(args, device)
    named = [(n, p) for n, p in built.peft_model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adamw_param_groups(named, args.weight_decay, lr=args.lr))
    scheduler = build_scheduler(optimizer, args.schedule, warmup_steps=0, total_steps=args.mntp_steps,
                                min_lr_ratio=args.min_lr_ratio)
    tokenizer = built.encoder.tokenizer
    return _MntpTraining(built, [p for _, p in named], optimizer, scheduler, mask_token_id(tokenizer),
                         set(getattr(tokenizer, "all_special_ids", []) or []))


def _mntp_batch_loss(args: argparse.Namespace, training: _MntpTraining, texts: list[str], step: int,
                     rank: int, device: torch.device) -> torch.Tensor:
    """The masked-token-prediction loss of this rank's passages (mask seeded by seed, step and rank)."""
    from .mntp import mask_captions, mntp_loss

    built = training.built
    # llm2vec's MNTP tokenises the raw passages (no prompt template, no instruction).
    enc = built.encoder.tokenizer(texts, padding=True, truncation=True, max_length=args.max_length,
                                  padding_side="right", return_tensors="pt")
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    ids, labels = mask_captions(enc["input_ids"], enc["attention_mask"], mask_id=training.mask_id,
                                special_ids=training.special_ids, probability=args.mntp_probability,
                                generator=gen, decoder=built.decoder)
    hidden = built.peft_model(input_ids=ids.to(device), attention_mask=enc["attention_mask"].to(device))
    return mntp_loss(hidden.last_hidden_state, labels.to(device), built.head, decoder=built.decoder)
