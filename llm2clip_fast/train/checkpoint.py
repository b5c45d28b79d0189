"""Atomic, pickle-free training checkpoints that allow an exact resume.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<NNNNNNNN>/`` holding:

- ``model.safetensors``: the trainable model state (whatever tensors the trainer passes);
- ``trainer_state.safetensors`` + ``trainer_state.json``: optimizer, scheduler, RNG states and any
  extra state, as a JSON skeleton whose tensors live in the safetensors file (no pickle anywhere,
  so loading a checkpoint cannot run code);
- ``meta.json``: step, epoch, data position (batches consumed in the current epoch), the run config
  and the list of files, written last.

The folder is assembled under a temporary name in the same parent, every file fsynced, then renamed
into place with ``os.replace``: a reader sees either the whole checkpoint or none of it, even if the
process is killed mid-write. :func:`latest_checkpoint` additionally checks ``meta.json`` and the files
it lists, so stray temporary folders are never picked up.
"""

from __future__ import annotations

import json
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
from safetensors.torch import load_file, save_file

CHECKPOINTS_DIRNAME = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_MODEL_FILE = "model.safetensors"
_STATE_TENSORS = "trainer_state.safetensors"
_STATE_JSON = "trainer_state.json"
_META = "meta.json"
FORMAT_VERSION = 1


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
) -> Path:
    """Write a checkpoint atomically and prune old ones; returns its folder.

    step: optimizer steps done. epoch, batch_index: the data position to resume from (the next
    batch to read is ``batch_index`` of ``epoch``). model_state: tensors to store (usually only
    the trainable ones). optimizer, scheduler: anything with ``state_dict()``. config: the run
    configuration (JSON-serialisable). extra: further state (tensors, numbers, strings, nested
    containers). keep_last: how many checkpoints to keep (None or 0 keeps all).
    RNG states are captured here, so call this at the point the resumed run will continue from.
    """
    if step < 0 or epoch < 0 or batch_index < 0:
        raise ValueError(f"step, epoch and batch_index must be >= 0, got {step}, {epoch}, {batch_index}")
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 or None, got {keep_last}")
    config_json = json.loads(json.dumps(dict(config or {}), default=str))

    final = checkpoint_dir(run_dir, step)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model_tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
        save_file(model_tensors, str(tmp / _MODEL_FILE), metadata={"format": "pt"})
        _fsync_file(tmp / _MODEL_FILE)

        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten({
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": capture_rng_state(),
            "extra": dict(extra or {}),
        }, tensors)
        save_file(tensors, str(tmp / _STATE_TENSORS))
        _fsync_file(tmp / _STATE_TENSORS)
        _write_json(tmp / _STATE_JSON, skeleton)
        _write_json(tmp / _META, {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "epoch": int(epoch),
            "batch_index": int(batch_index),
            "config": config_json,
            "files": [_MODEL_FILE, _STATE_TENSORS, _STATE_JSON],
        })
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (a resumed run passing the same point): swap the old one out first.
            trash = parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint folder (or a run folder: its latest checkpoint).

    Raises FileNotFoundError if there is no complete checkpoint there.
    """
    path = Path(path)
    if not _is_complete(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint at {path} (expected a checkpoint folder "
                                    f"with {_META}, or a run folder with {CHECKPOINTS_DIRNAME}/step_*)")
        path = latest
    meta = json.loads((path / _META).read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    tensors = load_file(str(path / _STATE_TENSORS))
    state = _unflatten(json.loads((path / _STATE_JSON).read_text(encoding="utf-8")), tensors)
    return Checkpoint(
        path=path,
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        batch_index=int(meta["batch_index"]),
        config=meta["config"],
        model_state=load_file(str(path / _MODEL_FILE)),
        optimizer_state=state["optimizer"],
        scheduler_state=state["scheduler"],
        rng=state["rng"],
        extra=state["extra"],
    )
