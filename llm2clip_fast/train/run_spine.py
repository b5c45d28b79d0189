"""The run spine of the ``stage1``, ``embed`` and ``stage2`` sub-commands: what every run does around
what its own step computes.

A trainer's ``run`` reads as these steps, in this order; each is one function here:

1. :func:`distributed_run` (a context manager): resolve ``--device`` (:func:`resolve_device`), start
   the process group under ``torchrun`` (gloo for a CPU run, NCCL for CUDA) with ``--dist-timeout``
   (:func:`add_distributed_arguments`), bind this rank to its GPU, check that collectives get tensors
   on that device, start the rank ledger (:mod:`.distributed_failures`); turn a failed collective into
   one line naming the ranks to blame; tear the group down when the run ends, however, so that none of
   its threads outlives the run.
2. :func:`locked_out_folder` (a context manager): on every rank before anything heavy loads, ``--out``
   may be used as asked (``--resume`` / ``--overwrite``; :mod:`.run_folder`, :func:`check_out_folder`);
   then rank 0 takes the folder's lock for the life of the run (:mod:`.folder_lock`), before any rank
   writes, and every rank learns the verdict (:func:`hold_folder`): a folder another run uses is refused.
3. :func:`autocast_factory`: bf16 autocast on CUDA (``auto``), always (``bf16``) or never (``fp32``).
4. :func:`start_or_resume`: a fresh run id at step 0, or the newest usable checkpoint, whose saved
   config must agree with this run on the trainer's must-match options (:func:`check_resume_config`).
5. :func:`prepare_out_folder` (rank 0 creates, cleans or empties ``--out``), then
   :func:`write_run_config`: the resolved options, once, as ``config.json``.
6. :func:`open_run_log` (a context manager): ``log.jsonl`` mirrored to ``--report-to``'s reporters,
   and the progress bar; both closed when the loop ends, however.
7. :func:`finish_run`, on rank 0: ``loss.png`` (a logged notice when there is nothing to draw),
   ``summary.json`` and the final log line.

The trainers keep what is their own: building their model, what a step computes, what a checkpoint
holds and how it is restored, and what they save at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..atomic_files import write_json_atomic
from ..data.stream_transport import is_stream_url
from ..distributed import resolve_device
from ..redaction import redact, redact_value
from ..writable_output import check_writable
from . import distributed_failures
from .checkpoint import Checkpoint, load_latest_usable
from .folder_lock import FolderLock
from .run_folder import RunFolderError, check_run_folder, new_run_id, prepare_run_folder
from .run_log import JsonlLog, TrainProgress, plot_loss_curve
from .scalar_reporters import ScalarReporters
from .stop_requests import REQUESTS as STOP_REQUESTS

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SUMMARY_NAME = "summary.json"
LOG_NAME = "log.jsonl"
LOSS_PLOT_NAME = "loss.png"
PRECISIONS = ("auto", "fp32", "bf16")
# Parsed-option entries that are bookkeeping of the command line, not settings of the run.
_NOT_SETTINGS = frozenset({"command", "recipe_origin"})
# Options that name files or folders: a resumed run compares where they lead, not how they were spelled.
PATH_OPTIONS = ("data", "embeddings", "init_model", "vision_path", "llm", "mntp_data", "eval_data")
RESOLVED_PATHS = "resolved_paths"
_GLOB_OR_BRACE = set("{*?[")
# torch's own default: long enough for rank 0 to save an 8B model while the others wait at a barrier.
DEFAULT_DIST_TIMEOUT_S = 1800.0

Say = Callable[[str], None]


# -------------------------------------------------------------------------------------------------
# 1. Where the run executes


@dataclass(frozen=True)
class RunPlace:
    """This process's place in the run: its device, its rank and the number of ranks."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder, logs and saves."""
        return self.rank == 0


def dist_timeout_seconds(text: str) -> float:
    """``--dist-timeout``'s value: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_distributed_arguments(group: Any) -> argparse.Action:
    """``--dist-timeout SECONDS`` on ``group``: every sub-command that starts a process group takes it."""
    return group.add_argument(
        "--dist-timeout", type=dist_timeout_seconds, default=DEFAULT_DIST_TIMEOUT_S, metavar="SECONDS",
        help="under torchrun: how long the start-up rendezvous and every collective wait for the other "
             "ranks before the run stops with one line naming the collective and the ranks that did not "
             "come (exit 10); it must exceed the longest wait of a rank for another, such as rank 0 "
             "saving the final model (default: 1800)")


@contextlib.contextmanager
def distributed_run(device_spec: str | None, *, flag: str = "--device",
                    timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> Iterator[RunPlace]:
    """Resolve the device, start the process group torchrun asks for (``timeout_s``: its collectives'
    and rendezvous' time limit, ``--dist-timeout``), bind this rank to its GPU, check the collectives'
    device and open the rank ledger; yields the :class:`RunPlace`.

    A failed or timed-out collective leaving the block becomes a
    :class:`~.distributed_failures.DistributedFailure` naming the collective and the ranks to blame.
    A process group this call started is torn down when the block ends, normally (after a barrier:
    every rank is done) or not; one the caller had already started is left alone. The block must drop
    its model wrappers (DDP, FSDP) before it ends: they hold the group
    (:func:`~llm2clip_fast.distributed.destroy_distributed` says why that matters)."""
    device = resolve_device(device_spec, flag=flag)
    started_here = not distributed.is_distributed()
    STOP_REQUESTS.reset()  # a lock lost by an earlier run of this process is not this run's
    clean = False
    try:
        # --device cpu on a GPU node: gloo, since NCCL exchanges CUDA tensors only.
        distributed.init_distributed_from_env(backend="gloo" if device.type == "cpu" else None,
                                              timeout_s=timeout_s)
        if started_here:
            distributed_failures.open_ledger(timeout_s)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        distributed.check_collective_device(device)  # every collective takes tensors on `device`
        yield RunPlace(device, distributed.get_rank(), distributed.get_world_size())
        clean = True
    except BaseException as exc:
        if not started_here:
            raise
        # Failing: a SIGTERM now (torchrun stops the other ranks when one dies) only records a request,
        # so the line printed says why the run failed, not that it was stopped.
        with STOP_REQUESTS.deferred():
            failure = distributed_failures.explain(exc)
            # The failed frames' locals (a DDP model holds the process group) must not keep the group
            # alive past the teardown.
            traceback.clear_frames(exc.__traceback__)
            _end_process_group(sync=False)
        if failure is not None:
            raise failure from exc
        raise
    finally:
        if started_here and clean:
            _end_process_group(sync=True)


def _end_process_group(*, sync: bool) -> None:
    """Tear down the process group this run started; a group that cannot be freed is reported."""
    if not distributed.is_distributed():
        distributed_failures.close_ledger()
        return
    if sync:
        distributed_failures.at("end of run: the closing barrier")
    distributed_failures.close_ledger()
    left = distributed.destroy_distributed(sync=sync)
    if left:
        logger.debug("the process group's threads still run after its teardown (%s): something still "
                     "holds the group; waited for them to be idle", ", ".join(left))


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the forward passes' autocast context.

    ``precision``: ``auto`` (bf16 autocast on CUDA, plain fp32 elsewhere), ``bf16`` (bf16 autocast on
    any device) or ``fp32`` (no autocast). A factory rather than one context, so each forward enters
    a fresh one.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# -------------------------------------------------------------------------------------------------
# 2, 5. The run folder and its config.json


def check_out_folder(out: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """``--out`` as a Path, after checking (on every rank, before anything heavy) that it may be used
    as asked and can be written; raises :class:`~.run_folder.RunFolderError`, ValueError or
    :class:`~llm2clip_fast.writable_output.OutputNotWritableError` otherwise."""
    out = Path(out)
    check_run_folder(out, resume=resume, overwrite=overwrite)
    check_writable(out, flag="--out", folder=True)
    return out


@contextlib.contextmanager
def hold_folder(folder: str | Path, *, main: bool, what: str, say: Say,
                check: Callable[[], None] | None = None) -> Iterator[FolderLock | None]:
    """Hold ``folder``'s :class:`~.folder_lock.FolderLock` for the block: taken by the ``main`` process
    (rank 0) for every rank of the run, then ``check()`` (run on rank 0 under the lock: what the folder
    holds may have changed while another run held it). Every rank raises when rank 0 could not take it
    (rank 0 its own error, the others :class:`~.run_folder.RunFolderError` with its message), so no rank
    waits for a run that will not start. Yields the lock on rank 0, None elsewhere. A collective under
    torchrun: every rank must enter it."""
    lock, failure = None, None
    if main:
        # Taken over by another run while this one lives: the trainers stop at the next step boundary.
        lock = FolderLock(folder, what=what, say=say, on_lost=STOP_REQUESTS.request_lock_lost)
        try:
            lock.acquire()
            if check is not None:
                check()
        except Exception as exc:  # every rank must hear of it, whatever it is
            lock.release()
            failure = exc
    distributed_failures.at(f"start-up: rank 0 takes the lock on {folder}, the other ranks wait for its "
                            "verdict (broadcast)")
    message = _rank0_verdict(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise RunFolderError(f"rank 0 could not take {folder}: {message}")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _rank0_verdict(message: str | None) -> str | None:
    """Rank 0's ``message`` on every rank (itself without a process group)."""
    if not distributed.is_distributed():
        return message
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def locked_out_folder(place: RunPlace, out: str | Path, *, resume: bool, overwrite: bool, say: Say,
                      what: str) -> Iterator[Path]:
    """``--out`` as a Path, checked on every rank (:func:`check_out_folder`) and locked by rank 0 for
    the block (:func:`hold_folder`), the check repeated under the lock. ``what`` names this run to a
    second one (``"stage2 run"``)."""
    out = check_out_folder(out, resume=resume, overwrite=overwrite)
    with hold_folder(out, main=place.main, what=what, say=say,
                     check=lambda: check_run_folder(out, resume=resume, overwrite=overwrite)):
        yield out


def prepare_out_folder(place: RunPlace, out: Path, *, resume: bool, overwrite: bool, say: Say) -> None:
    """On rank 0: create ``out``, remove an interrupted save's temporaries, and with ``overwrite``
    delete what it holds, saying what (:func:`~.run_folder.prepare_run_folder`). Other ranks: nothing."""
    if place.main:
        prepare_run_folder(out, resume=resume, overwrite=overwrite, say=say)


def resolved_spec(spec: str) -> str:
    """Where a path option leads, for comparing two spellings of it: each ``::``-joined part that is a
    local path made absolute with symbolic links resolved (a brace or glob pattern: its folder), a URL
    or ``pipe:`` command redacted, anything else (a hub model name) as given."""
    parts = []
    for part in str(spec).split("::"):
        if is_stream_url(part):
            parts.append(redact(part))
            continue
        local = part[len("file://"):] if part.lower().startswith("file://") else part
        local = os.path.expanduser(local[len("file:"):] if local.startswith("file:") else local)
        head, tail = os.path.split(local)
        if os.path.exists(local):
            parts.append(os.path.realpath(local))
        elif (head and os.path.isdir(head)) or (not head and _GLOB_OR_BRACE & set(tail)):
            parts.append(os.path.join(os.path.realpath(head or "."), tail))
        else:
            parts.append(part)
    return "::".join(parts)


def options_config(args: Any) -> dict[str, Any]:
    """The parsed options of a run as JSON values (tuples become lists), without the command line's
    bookkeeping (``command``, ``recipe_origin``) and private entries (``_name``), with every credential
    masked (:func:`~llm2clip_fast.redaction.redact_value`: what is saved or logged never holds one), and
    under ``resolved_paths`` where each path option leads (:func:`resolved_spec`), so a resumed run
    given the same files by another spelling (absolute, relative, through a link) is not refused."""
    config = {k: redact_value(list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
              if k not in _NOT_SETTINGS and not k.startswith("_")}
    paths = {k: resolved_spec(config[k]) for k in PATH_OPTIONS if isinstance(config.get(k), str)}
    if paths:
        config[RESOLVED_PATHS] = paths
    return config


def settings_from(args: Any) -> dict[str, str]:
    """Where each option a recipe tracks got its value (``flag``, ``recipe``, ``default``, ``derived``)."""
    return dict(getattr(args, "recipe_origin", None) or {})


def write_run_config(out: Path, config: dict[str, Any], *, sort_keys: bool = False) -> Path:
    """Write the resolved config atomically as ``out/config.json`` (call on rank 0 only)."""
    return write_json_atomic(out / CONFIG_NAME, config, sort_keys=sort_keys)


# -------------------------------------------------------------------------------------------------
# 4. Fresh start or resume


def _json_value(value: Any) -> Any:
    """A value as JSON reads it back (tuples are lists), so a saved config compares equal to a live one."""
    return json.loads(json.dumps(value))


def _comparable(config: dict[str, Any], key: str) -> Any:
    """``config[key]`` as a resumed run compares it: credentials masked (the checkpoint holds the
    redacted value, the run the real one), a path option by where it leads (the ``resolved_paths``
    recorded with it, else resolved now)."""
    value = config.get(key)
    if key in PATH_OPTIONS and isinstance(value, str):
        recorded = (config.get(RESOLVED_PATHS) or {}).get(key)
        return recorded if isinstance(recorded, str) else resolved_spec(value)
    return _json_value(redact_value(value))


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], must_match: Sequence[str], *,
                        checkpoint: Path | str) -> None:
    """Raise ValueError naming every option of ``must_match`` whose value in the checkpoint's config
    differs from this run's, since the run could not continue exactly. An option absent from the saved
    config (a checkpoint written before the option existed) is not compared. Values are compared with
    their credentials masked (a presigned URL with a fresh signature is the same data) and path options
    by where they lead (:func:`resolved_spec`)."""
    # Named by their config.json key: a few differ from their flag (wd: --weight-decay).
    changed = [f"{k}: {redact_value(saved[k])!r} in the checkpoint, {redact_value(current.get(k))!r} now"
               for k in must_match if k in saved and _comparable(saved, k) != _comparable(current, k)]
    if changed:
        raise ValueError(f"--resume from {checkpoint}: these options differ from the interrupted run, so it "
                         f"cannot continue exactly: {'; '.join(changed)}")


@dataclass
class RunStart:
    """Where a run starts: fresh (``checkpoint`` None, step 0) or from the checkpoint it resumes."""

    run_id: str
    checkpoint: Checkpoint | None = None

    @property
    def resumed(self) -> bool:
        return self.checkpoint is not None

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0

    @property
    def epoch(self) -> int:
        return self.checkpoint.epoch if self.checkpoint is not None else 0

    @property
    def batch_index(self) -> int:
        return self.checkpoint.batch_index if self.checkpoint is not None else 0

    @property
    def log_from(self) -> int | None:
        """``resume_step`` of the log and reporters: the checkpoint's step, None for a fresh log."""
        return self.step if self.checkpoint is not None else None


def start_or_resume(out: Path, *, resume: bool, config: dict[str, Any], must_match: Sequence[str],
                    say: Say, upgrade_saved: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                    ) -> RunStart:
    """A fresh start (new run id), or with ``resume`` the newest usable checkpoint of ``out`` (damaged
    newer ones reported through ``say``; :class:`~.checkpoint.CheckpointError` when none is usable),
    its config checked against ``config`` (:func:`check_resume_config`). ``upgrade_saved`` turns an
    older checkpoint's config into today's keys first (an option renamed since), so a renamed option is
    still compared instead of skipped as absent. The trainer restores the checkpoint's state itself."""
    if not resume:
        return RunStart(new_run_id())
    ckpt = load_latest_usable(out, say)
    saved = upgrade_saved(dict(ckpt.config)) if upgrade_saved is not None else ckpt.config
    check_resume_config(saved, config, must_match, checkpoint=ckpt.path)
    return RunStart(ckpt.run_id or new_run_id(), ckpt)


# -------------------------------------------------------------------------------------------------
# 6. The log, the reporters, the progress bar


@contextlib.contextmanager
def open_run_log(place: RunPlace, out: Path, *, start: RunStart, report_to: list[str], config: dict[str, Any],
                 total_steps: int, unit_name: str, desc: str,
                 progress: bool = True) -> Iterator[tuple[JsonlLog, TrainProgress]]:
    """``(log, progress)`` for the training loop: ``out/log.jsonl`` (on resume, records after the
    checkpoint's step dropped) mirrored to ``--report-to``'s reporters, and the progress bar counting
    ``unit_name`` per second from the start's step. Rank 0 only (no-ops elsewhere); ``progress``
    False hides the bar. Both are closed when the block ends, however."""
    reporters = ScalarReporters(report_to, out, resume_step=start.log_from, config=config, enabled=place.main)
    log = JsonlLog(out / LOG_NAME, resume_step=start.log_from, enabled=place.main, mirror=reporters)
    bar = TrainProgress(total_steps, initial=start.step, unit_name=unit_name, desc=desc,
                        enabled=place.main and progress)
    try:
        yield log, bar
    finally:
        bar.close()
        log.close()


# -------------------------------------------------------------------------------------------------
# 7. The end


def plot_run_loss(out: Path, *, title: str, say: Say) -> Path | None:
    """Draw ``out/log.jsonl``'s loss into ``out/loss.png``; returns its path, or None with a logged
    notice when there is nothing to draw (a resumed run that was already complete) or no matplotlib."""
    try:
        return plot_loss_curve(out / LOG_NAME, out / LOSS_PLOT_NAME, title=title)
    except ValueError:
        say(f"no {LOSS_PLOT_NAME}: {out / LOG_NAME} holds no loss to draw (this process ran no step)")
        return None


def finish_run(out: Path, *, plot_title: str, summary: dict[str, Any], say: Say,
               final_lines: Sequence[str] = ()) -> None:
    """The end of a run, on rank 0: ``loss.png`` (:func:`plot_run_loss`), ``summary.json`` (written
    atomically), then the closing log lines through ``say``."""
    plot_run_loss(out, title=plot_title, say=say)
    write_json_atomic(out / SUMMARY_NAME, summary)
    for line in final_lines:
        say(line)


__all__ = [
    "CONFIG_NAME",
    "DEFAULT_DIST_TIMEOUT_S",
    "PRECISIONS",
    "RunPlace",
    "RunStart",
    "add_distributed_arguments",
    "autocast_factory",
    "check_out_folder",
    "check_resume_config",
    "distributed_run",
    "finish_run",
    "hold_folder",
    "locked_out_folder",
    "open_run_log",
    "options_config",
    "plot_run_loss",
    "prepare_out_folder",
    "resolve_device",
    "resolved_spec",
    "settings_from",
    "start_or_resume",
    "write_run_config",
]
