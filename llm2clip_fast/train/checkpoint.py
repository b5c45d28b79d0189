"""Atomic, pickle-free training checkpoints that allow an exact resume.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<NNNNNNNN>/`` holding:

- ``model.safetensors``: the trainable model state (whatever tensors the trainer passes);
- ``trainer_state.safetensors`` + ``trainer_state.json``: optimizer, scheduler, RNG states and any
  extra state, as a JSON skeleton whose tensors live in the safetensors file (no pickle anywhere,
  so loading a checkpoint cannot run code);
- ``meta.json``: step, epoch, data position (batches consumed in the current epoch), the run config,
  the run's id, and the list of files with their SHA-256 checksums;
- ``SHA256SUMS``, written last: the SHA-256 of every other file, ``meta.json`` included, in
  ``sha256sum`` format (``sha256sum -c SHA256SUMS`` checks a checkpoint by hand). So a flipped digit
  of ``meta.json``'s step is caught like a flipped bit of the weights.

The folder is assembled under a temporary name in the same parent, every file fsynced, then renamed
into place with ``os.replace``: a reader sees either the whole checkpoint or none of it, even if the
process is killed mid-write. :func:`latest_checkpoint` additionally checks ``meta.json`` and the files
it lists, so stray temporary folders are never picked up. :func:`load_checkpoint` verifies the
checksums and names the damaged file; a checkpoint written before ``SHA256SUMS`` existed (format 1)
still loads, with a logged warning naming what cannot be verified. :func:`load_latest_usable` walks back
from the newest checkpoint to the newest one that verifies, reporting each damaged one by path. Pruning
(``keep_last``) removes only checkpoints of the same ``run_id``, so a run never deletes another run's
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic_files import fsync_dir, replace_dir

CHECKPOINTS_DIRNAME = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_MODEL_FILE = "model.safetensors"
_STATE_TENSORS = "trainer_state.safetensors"
_STATE_JSON = "trainer_state.json"
_META = "meta.json"
_SUMS = "SHA256SUMS"
# 2: SHA256SUMS covers every file, meta.json included. 1: meta.json alone lists the other files' sums.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is damaged (bad checksum, truncated or unreadable file) or none is usable."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``rng`` goes to :func:`restore_rng_state`; the rest to their owners."""

    path: Path
    step: int
    epoch: int
    batch_index: int
    config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    rng: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None


# ---------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if initialised) every CUDA device's generator state."""
    np_state = np.random.get_state(legacy=False)  # noqa: NPY002 - the global stream is what code uses
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state({  # noqa: NPY002
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": int(np_state["pos"])},
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------
# Pickle-free serialisation of nested state (optimizer/scheduler state dicts, RNG states)


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj``; tensors are moved to ``tensors`` and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # Detached, contiguous CPU copies: safetensors refuses shared or strided storage.
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return {"__float__": repr(obj)}  # repr round-trips exactly, including inf and nan
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if isinstance(obj, Mapping):
        # Optimizer state is keyed by int parameter ids; keep key types, not just strings.
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (np.integer, np.floating)):
        return _flatten(obj.item(), tensors)
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint: {obj!r:.80}")


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        raise ValueError(f"unknown entry in checkpoint state: {sorted(obj)}")
    return obj


# ---------------------------------------------------------------------------------------------
# Files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


_fsync_dir = fsync_dir


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def checkpoint_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``run_dir``."""
    return Path(run_dir) / CHECKPOINTS_DIRNAME / f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    step: int,
    epoch: int,
    batch_index: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
    run_id: str | None = None,
) -> Path:
    """Write a checkpoint atomically and prune old ones; returns its folder.

    step: optimizer steps done. epoch, batch_index: the data position to resume from (the next
    batch to read is ``batch_index`` of ``epoch``). model_state: tensors to store (usually only
    the trainable ones). optimizer, scheduler: anything with ``state_dict()``. config: the run
    configuration (JSON-serialisable). extra: further state (tensors, numbers, strings, nested
    containers). keep_last: how many checkpoints of this run to keep (None or 0 keeps all).
    run_id: the run this checkpoint belongs to; pruning then removes only older checkpoints with the
    same id (None: every checkpoint in the folder counts as this run's).
    RNG states are captured here, so call this at the point the resumed run will continue from.
    """
    _check_save_arguments(step, epoch, batch_index, keep_last)
    # Converted before anything is written: a config that is not JSON fails with nothing on disk.
    config_json = json.loads(json.dumps(dict(config or {}), default=str))
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_model_file(tmp, model_state)
        _write_trainer_state(tmp, optimizer, scheduler, extra)
        _write_meta(tmp, {"step": int(step), "epoch": int(epoch), "batch_index": int(batch_index),
                          "run_id": run_id, "config": config_json})
        _write_sums(tmp)
        _fsync_dir(tmp)
        # Re-saving a step (a resumed run passing the same point) swaps the old one out first.
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        _prune_checkpoints(run_dir, run_id, keep_last)
    return final


def _check_save_arguments(step: int, epoch: int, batch_index: int, keep_last: int | None) -> None:
    """Raise ValueError for a negative position or ``keep_last``."""
    if step < 0 or epoch < 0 or batch_index < 0:
        raise ValueError(f"step, epoch and batch_index must be >= 0, got {step}, {epoch}, {batch_index}")
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 or None, got {keep_last}")


def _write_model_file(folder: Path, model_state: Mapping[str, torch.Tensor]) -> None:
    """``model.safetensors``: CPU copies of ``model_state`` (safetensors refuses shared storage), fsynced."""
    model_tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    save_file(model_tensors, str(folder / _MODEL_FILE), metadata={"format": "pt"})
    _fsync_file(folder / _MODEL_FILE)


def _write_trainer_state(folder: Path, optimizer: Any | None, scheduler: Any | None,
                         extra: Mapping[str, Any] | None) -> None:
    """``trainer_state.safetensors`` + ``trainer_state.json``: the optimizer, scheduler, the RNG states
    captured now and ``extra``, as a JSON skeleton whose tensors live in the safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten({
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "extra": dict(extra or {}),
    }, tensors)
    save_file(tensors, str(folder / _STATE_TENSORS))
    _fsync_file(folder / _STATE_TENSORS)
    _write_json(folder / _STATE_JSON, skeleton)


def _write_meta(folder: Path, position: dict[str, Any]) -> None:
    """``meta.json``, written last: the format version, ``position`` (step, epoch, batch_index,
    run_id, config) and the SHA-256 of each data file, so a reader can tell a complete checkpoint."""
    files = [_MODEL_FILE, _STATE_TENSORS, _STATE_JSON]
    _write_json(folder / _META, {
        "format_version": FORMAT_VERSION,
        **position,
        "files": files,
        "sha256": {name: file_sha256(folder / name) for name in files},
    })


def _write_sums(folder: Path) -> None:
    """``SHA256SUMS``, written last: every file of the checkpoint, ``meta.json`` included."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != _SUMS)
    text = "".join(f"{file_sha256(folder / name)}  {name}\n" for name in names)
    with open(folder / _SUMS, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_sums(path: Path) -> dict[str, str]:
    """``{file name: sha256}`` of a ``SHA256SUMS`` file; :class:`CheckpointError` when malformed."""
    sums: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); the checkpoint is damaged") from None
    for number, line in enumerate(lines, 1):
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or not name or "/" in name:
            raise CheckpointError(f"{path} is damaged: line {number} is not '<sha256>  <file>'")
        sums[name] = digest
    return sums


def _prune_checkpoints(run_dir: str | os.PathLike[str], run_id: str | None, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints of ``run_id`` (None: of any run)."""
    mine = [p for p in list_checkpoints(run_dir) if run_id is None or _run_id_of(p) == run_id]
    for old in mine[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _run_id_of(path: Path) -> str | None:
    try:
        return json.loads((path / _META).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError):
        return None


def _is_complete(path: Path) -> bool:
    meta = path / _META
    if not meta.is_file():
        return False
    try:
        files = json.loads(meta.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((path / name).is_file() for name in files)


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    parent = Path(run_dir) / CHECKPOINTS_DIRNAME
    if not parent.is_dir():
        return []
    found = []
    for p in parent.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and _is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def step_folders(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Every ``checkpoints/step_*`` folder of ``run_dir``, complete or not, oldest first."""
    parent = Path(run_dir) / CHECKPOINTS_DIRNAME
    if not parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in parent.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint folder: ``SHA256SUMS`` against ``meta.json`` first, then against every other
    file, which must include each file ``meta.json`` lists; returns the metadata. Raises
    :class:`CheckpointError` naming the damaged file. A format-1 checkpoint (written before
    ``SHA256SUMS``) is checked against ``meta.json``'s own sums, and a logged warning names what cannot
    be verified (``meta.json`` itself; every file when it predates checksums altogether)."""
    path = Path(path)
    meta_path = path / _META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing (the save did not finish)")
    sums_path = path / _SUMS
    sums = _read_sums(sums_path) if sums_path.is_file() else None
    if sums is not None:
        if _META not in sums:
            raise CheckpointError(f"{sums_path} does not list {_META}; the checkpoint is damaged")
        _check_file(path / _META, sums[_META], _SUMS)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = list(meta["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path} is damaged: {exc}") from None
    version = meta.get("format_version")
    if version not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: checkpoint format {version}, this reader reads formats "
                              f"{', '.join(map(str, READABLE_FORMATS))}")
    if sums is None and version >= 2:
        raise CheckpointError(f"{sums_path} is missing: a format-{version} checkpoint cannot be verified "
                              "without it (the checkpoint is damaged)")
    if sums is not None:
        unlisted = [name for name in files if name not in sums]
        if unlisted:
            raise CheckpointError(f"{sums_path} does not list {', '.join(unlisted)}; the checkpoint is "
                                  "damaged")
        for name, digest in sums.items():
            if name != _META:
                _check_file(path / name, digest, _SUMS)
        return meta
    recorded = meta.get("sha256") or {}
    for name in files:
        if name in recorded:
            _check_file(path / name, recorded[name], _META)
        elif not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
    unverified = [_META] + [name for name in files if name not in recorded]
    logger.warning("checkpoint %s was written before checkpoints carried %s: %s cannot be verified (a "
                   "damaged step, data position or config there would go unnoticed); using it anyway",
                   path, _SUMS, ", ".join(unverified))
    return meta


def _check_file(file: Path, digest: str, where: str) -> None:
    """:class:`CheckpointError` unless ``file`` exists and its SHA-256 is ``digest``."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    if file_sha256(file) != digest:
        raise CheckpointError(f"{file} is damaged: its SHA-256 differs from the one recorded in {where} "
                              "at save (truncated or modified)")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is unreadable ({exc}); the checkpoint is damaged") from None


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is unreadable ({exc}); the checkpoint is damaged") from None


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint folder (or a run folder: its latest complete checkpoint), verifying checksums.

    Raises FileNotFoundError if there is no complete checkpoint there, :class:`CheckpointError`
    (naming the file) if it is damaged.
    """
    path = Path(path)
    if not _is_complete(path) and not _STEP_DIR.match(path.name):
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint at {path} (expected a checkpoint folder "
                                    f"with {_META}, or a run folder with {CHECKPOINTS_DIRNAME}/step_*)")
        path = latest
    meta = verify_checkpoint(path)
    tensors = _read_tensors(path / _STATE_TENSORS)
    try:
        state = _unflatten(_read_json(path / _STATE_JSON), tensors)
    except KeyError as exc:
        raise CheckpointError(f"{path / _STATE_JSON} refers to tensor {exc} missing from "
                              f"{path / _STATE_TENSORS}; the checkpoint is damaged") from None
    return Checkpoint(
        path=path,
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        batch_index=int(meta["batch_index"]),
        config=meta["config"],
        model_state=_read_tensors(path / _MODEL_FILE),
        optimizer_state=state["optimizer"],
        scheduler_state=state["scheduler"],
        rng=state["rng"],
        extra=state["extra"],
        run_id=meta.get("run_id"),
    )


def load_latest_usable(run_dir: str | os.PathLike[str], say: Any = print) -> Checkpoint:
    """The newest checkpoint of ``run_dir`` that verifies; each damaged newer one is reported through
    ``say`` by path and reason, and so is the fallback. Raises :class:`CheckpointError` when no
    checkpoint is usable (never a silent fresh start)."""
    candidates = step_folders(run_dir)
    problems: list[str] = []
    for path in reversed(candidates):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            say(f"checkpoint {path} is damaged, not used: {exc}")
            continue
        if problems:
            say(f"resuming from {path}, the newest complete checkpoint "
                f"({len(problems)} newer one(s) damaged)")
        return ckpt
    where = Path(run_dir) / CHECKPOINTS_DIRNAME
    detail = "; ".join(problems) if problems else f"there is no checkpoint in {where}"
    raise CheckpointError(f"--resume: no usable checkpoint in {run_dir}: {detail}. Drop --resume (and pass "
                          "--overwrite) to train from scratch")
