"""torch.distributed helpers: process set-up from torchrun's environment, rank queries, sharding.

Every helper works, and answers as a single process would, when torch.distributed is unavailable or
not initialised, so training code can call them unconditionally.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = [
    "barrier",
    "destroy_distributed",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed_from_env",
    "is_distributed",
    "is_main_process",
    "shard_indices",
]


def is_distributed() -> bool:
    """Whether torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def get_local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``; 0 when unset)."""
    local = _env_int("LOCAL_RANK")
    return 0 if local is None else local


def init_distributed_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's environment, if it asks for one.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. When
    ``WORLD_SIZE`` is absent or 1, nothing is initialised and ``False`` is returned (single process).
    Otherwise the process group is created with ``backend`` (default: ``"nccl"`` when CUDA is
    available, ``"gloo"`` otherwise) and, on CUDA, the current device is set to ``LOCAL_RANK``
    first, so that NCCL binds each rank to its own GPU. Calling it when a process group already exists
    does nothing and returns ``True``.

    Returns whether distributed execution is active.
    """
    if not dist.is_available():
        world = _env_int("WORLD_SIZE")
        if world is not None and world > 1:
            raise RuntimeError(
                f"WORLD_SIZE={world} asks for distributed training "
                "but this torch build has no torch.distributed"
            )
        return False
    if dist.is_initialized():
        return True
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return False
    rank = _env_int("RANK")
    if rank is None:
        raise ValueError("WORLD_SIZE > 1 but RANK is not set; launch with torchrun or set RANK")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set; launch with torchrun or set them")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo", "mpi", "ucc") and ":" not in backend:
        raise ValueError(
            f"backend must be 'nccl', 'gloo', 'mpi', 'ucc' or a device:backend map, got {backend!r}"
        )
    kwargs = {}
    if torch.cuda.is_available() and "nccl" in backend:
        local = get_local_rank()
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices "
                "are visible on this node"
            )
        torch.cuda.set_device(local)
        # Binding the group to the device lets NCCL set up its communicator eagerly and avoids the
        # "guessing device" warning (and the wrong-GPU hang it warns about).
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return True


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """Rank of this process in ``group`` (default group when ``None``); 0 when not distributed."""
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (default group when ``None``); 1 when not distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this is global rank 0 (always true for a single process): the one that logs and saves."""
    return get_rank() == 0


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait until every rank of ``group`` reaches this point; no-op when not distributed."""
    if is_distributed():
        dist.barrier(group)


def destroy_distributed() -> None:
    """Tear down the default process group if one exists (safe to call more than once)."""
    if is_distributed():
        dist.destroy_process_group()


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world_size`` owns.

    Blocks differ in length by at most one (the first ``n % world_size`` ranks get one more) and
    together cover ``range(n)`` exactly once, in order.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
