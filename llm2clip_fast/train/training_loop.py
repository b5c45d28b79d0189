"""The one training loop of stage 1, its MNTP phase and stage 2: the rules every optimizer step follows.

A stage supplies a :class:`StageSteps` (its micro-batches, their forward and backward, its log fields
and its checkpoint); :func:`run_steps` runs the steps under these rules, the same for every stage:

1. **Micro-batches.** Each optimizer step draws exactly ``grad_accum`` micro-batches
   (:class:`MicroBatches`, drawn on demand, so a stage that interleaves drawing and forward keeps its
   random streams in order). A stage whose micro-batch losses are independent accumulates them with
   :func:`accumulate_separately` (each loss scaled by ``1/grad_accum``); stage 2's global-batch loss
   spans all micro-batches and runs its own accumulation (``stage2.train_step``).
2. **Gradient sync.** After the backward, the loop averages over the ranks the gradients of the
   parameters no wrapper synchronises (:attr:`StageSteps.hand_synced`: stage 1's LoRA weights; under
   FSDP stage 2's replicated logit scale/bias; nothing under DDP, whose backward did it).
3. **Clipping.** The global gradient norm of the trainable parameters is clipped to
   ``max_grad_norm`` (0: measured only).
4. **Non-finite values stop the run before the update.** A non-finite loss (over all ranks) or
   gradient norm raises :class:`~.non_finite.NonFiniteTrainingError` (exit code 8) naming the step
   *before* ``optimizer.step()``, so the weights never take that update; the last good checkpoint is
   kept (nothing of the step is saved). The weights are checked again after the update (an overflow
   inside the optimizer) and the run stops the same way, saving nothing.
5. **Schedule.** ``scheduler.step()`` once per optimizer step, after the update; the logged ``lr`` is
   the one the update used (the first group's, without its layer-wise multiplier).
6. **Logging.** Step 1, every ``log_every``-th step and the last step are logged.
7. **Checkpoints.** Every ``save_every``-th step before the last (``save_every`` 0: none in
   between), and always after the last step; the stage's final model is saved by the stage after
   the loop, whatever ``save_every`` says. A stage that saves no checkpoints (the MNTP phase)
   returns None from :meth:`StageSteps.save_checkpoint`.
8. **Stopping.** After every step the ranks agree whether to stop (one tiny all-reduce,
   :func:`~.stop_requests.agreed_stop`) before anything of the step is written: a lost folder lock
   stops without writing (the folder is another run's, exit 4); SIGTERM saves a checkpoint at that
   step and stops (exit 143). SIGTERM during a step only records the request.
9. **Distributed failures.** Before each step's collectives and at the stop-flag all-reduce the loop
   records where this rank is (:func:`~.distributed_failures.at`), so a lost rank is reported with the
   collective the others waited in.

Nothing evaluates periodically inside the loop: stage 1 measures caption retrieval before and after
the steps; stage 2 leaves evaluation to ``python -m llm2clip_fast.train eval`` on the saved model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .. import distributed as dist_helpers
from . import distributed_failures
from .non_finite import NonFiniteTrainingError, all_params_finite
from .optim import clip_grad_norm
from .stop_requests import REQUESTS as STOP_REQUESTS
from .stop_requests import RunPreempted, agreed_stop, lock_taken_over


@dataclass(frozen=True)
class LoopRules:
    """The numbers that decide a run's steps (the stage's options, checked by the stage)."""

    total_steps: int
    grad_accum: int = 1
    max_grad_norm: float = 0.0  # 0: only measure the gradient norm
    log_every: int = 1
    save_every: int = 0  # 0: no checkpoint before the last step

    def logs(self, step: int) -> bool:
        """Whether ``step`` (1-based) is logged: the first, every ``log_every``-th and the last."""
        return step == 1 or step % self.log_every == 0 or step == self.total_steps

    def saves_between(self, step: int) -> bool:
        """Whether a checkpoint is saved after ``step`` before the last step."""
        return bool(self.save_every) and step % self.save_every == 0 and step < self.total_steps


@dataclass(frozen=True)
class StepWork:
    """What a stage's forward and backward of one step returns: the step's loss over all ranks (as
    the stage defines it) and the samples (captions, images) it covered over all ranks."""

    loss: float
    units: int


@dataclass(frozen=True)
class StepDone:
    """One finished optimizer step, as the loop measured it (``step`` is 1-based)."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    units: int
    seconds: float
    rate: float | None = None  # units per second of the progress bar, None without one


class StageSteps(Protocol):
    """What a stage hands the loop."""

    name: str  # "stage 1", "stage 2", "stage 1's MNTP phase": in error messages
    out: Path  # the run folder (named when its lock is lost)
    device: torch.device
    trainable: list[nn.Parameter]  # clipped and checked for non-finite values
    hand_synced: list[nn.Parameter]  # gradients the loop averages over the ranks
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def step_label(self, step: int) -> str:
        """How messages name optimizer step ``step`` (1-based): ``"step 3"``, ``"MNTP step 3"``."""

    def collectives(self, step: int) -> str:
        """The distributed point before step ``step``'s collectives (names them for failure reports)."""

    def next_micro_batch(self) -> Any:
        """The next micro-batch of the stage's stream."""

    def forward_backward(self, micro: MicroBatches) -> StepWork:
        """Forward and backward of the step's micro-batches (gradients accumulate in ``.grad``)."""

    def after_update(self) -> None:
        """After ``optimizer.step()`` (stage 2 clamps its logit scale)."""

    def finished(self, done: StepDone) -> None:
        """After every step (the stage's counts: steps, losses, samples)."""

    def log_fields(self, done: StepDone) -> dict[str, Any]:
        """The ``log.jsonl`` record of a logged step."""

    def save_checkpoint(self, step: int) -> Any:
        """Save a checkpoint at ``step`` (collective); its folder, or None when the stage saves none."""

    def last_checkpoint(self) -> Any:
        """The newest checkpoint saved (for the non-finite message), None when there is none."""

    def before_final_checkpoint(self) -> None:
        """Checks after the last step, before its checkpoint (the bad-data fraction of a partial epoch)."""

    def preempted(self, step: int, total: int, checkpoint: Any) -> RunPreempted:
        """The error of a run stopped by SIGTERM after ``step`` that saved ``checkpoint``."""


class MicroBatches:
    """One step's ``count`` micro-batches, drawn from ``draw`` as they are iterated (once)."""

    def __init__(self, draw: Callable[[], Any], count: int) -> None:
        self._draw, self.count, self.drawn = draw, count, 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        if self.drawn:
            raise RuntimeError("a step's micro-batches are drawn once")
        for _ in range(self.count):
            self.drawn += 1
            yield self._draw()


def accumulate_separately(micro: MicroBatches, loss_of: Callable[[Any], torch.Tensor]) -> float:
    """Forward and backward of micro-batches whose losses are independent: each loss is scaled by
    ``1/len(micro)`` before its backward, so the gradients are those of the mean loss. Returns this
    rank's mean loss."""
    k = len(micro)
    total = 0.0
    for mb in micro:
        loss = loss_of(mb)
        (loss / k).backward()
        total += float(loss.detach()) / k
    return total


def _non_finite(stage: StageSteps, step: int, what: str) -> NonFiniteTrainingError:
    last = stage.last_checkpoint()
    kept = f"the last good checkpoint {last} is kept" if last is not None else "no checkpoint was saved yet"
    return NonFiniteTrainingError(
        f"{stage.name} stopped at {stage.step_label(step)}: {what}. The step's update was not saved; {kept}. "
        "Lower --lr, keep --max-grad-norm on, or check the data around this step, then --resume")


def first_group_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr the next update uses, without the first group's layer-wise multiplier (``lr_scale``)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def apply_update(stage: StageSteps, rules: LoopRules, step: int, work: StepWork) -> tuple[float, float]:
    """Gradient sync, clipping, the non-finite check, the update and the schedule of step ``step``
    (1-based). Returns (grad norm, lr)."""
    dist_helpers.average_gradients(stage.hand_synced)
    grad_norm = clip_grad_norm(stage.trainable, rules.max_grad_norm)
    if not (math.isfinite(work.loss) and math.isfinite(grad_norm)):
        raise _non_finite(stage, step, f"loss {work.loss}, gradient norm {grad_norm}")
    lr = first_group_lr(stage.optimizer)
    stage.optimizer.step()
    if not all_params_finite(stage.trainable):
        raise _non_finite(stage, step, f"the optimizer update (lr {lr}) made trainable weights non-finite")
    stage.optimizer.zero_grad(set_to_none=True)
    stage.scheduler.step()
    stage.after_update()
    return grad_norm, lr


def take_step(stage: StageSteps, rules: LoopRules, step: int) -> StepDone:
    """Optimizer step ``step + 1``: its micro-batches, forward and backward, then :func:`apply_update`."""
    distributed_failures.at(stage.collectives(step + 1))
    t0 = time.perf_counter()
    micro = MicroBatches(stage.next_micro_batch, rules.grad_accum)
    work = stage.forward_backward(micro)
    if micro.drawn != micro.count:
        raise RuntimeError(f"{stage.name} used {micro.drawn} of the step's {micro.count} micro-batches")
    grad_norm, lr = apply_update(stage, rules, step + 1, work)
    return StepDone(step + 1, work.loss, grad_norm, lr, work.units, time.perf_counter() - t0)


def run_steps(stage: StageSteps, rules: LoopRules, start_step: int, log: Any = None,
              progress: Any = None) -> int:
    """Optimizer steps from ``start_step`` to ``rules.total_steps`` under the module's rules; ``log``
    (``.log(record)``) and ``progress`` (``.update(units, loss=, lr=)`` returning a rate) may be None.
    Returns the steps done in all (``rules.total_steps``) after the final checkpoint."""
    step = start_step
    with STOP_REQUESTS.deferred():
        while step < rules.total_steps:
            done = take_step(stage, rules, step)
            step = done.step
            if progress is not None:
                done = _with_rate(done, progress.update(done.units, loss=done.loss, lr=done.lr))
            stage.finished(done)
            record = stage.log_fields(done) if rules.logs(step) else None
            distributed_failures.at(f"{stage.step_label(step)}: the stop-flag all-reduce at the step "
                                    "boundary")
            stop = agreed_stop(stage.device)
            if stop is not None and stop.lock_lost:  # the folder is another run's now: write nothing
                raise lock_taken_over(stage.out, step, stop.note)
            if record is not None and log is not None:
                log.log(record)
            if stop is not None:  # SIGTERM: a checkpoint at the step every rank stopped after
                raise stage.preempted(step, rules.total_steps, stage.save_checkpoint(step))
            if rules.saves_between(step):
                stage.save_checkpoint(step)
    stage.before_final_checkpoint()
    stage.save_checkpoint(step)
    return step


def _with_rate(done: StepDone, rate: float | None) -> StepDone:
    return StepDone(done.step, done.loss, done.grad_norm, done.lr, done.units, done.seconds, rate)


__all__ = ["LoopRules", "MicroBatches", "StageSteps", "StepDone", "StepWork", "accumulate_separately",
           "apply_update", "first_group_lr", "run_steps", "take_step"]
