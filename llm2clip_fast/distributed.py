"""torch.distributed helpers: process set-up, rank queries, and the collectives the global-batch losses use.

- Process set-up from torchrun's environment, rank queries, barrier, sharding. These answer as a
  single process would when torch.distributed is unavailable or not initialised, so training code
  can call them unconditionally.
- :func:`check_collective_device`: the rule for every tensor handed to a collective. It must live on
  the device the trainer runs on, and that device must be one the process group exchanges (NCCL:
  this rank's CUDA device only). Trainers check their device once after set-up and then build every
  collective's tensors on it (``device=``), never on the default (CPU) device.
- Row collectives for the global-batch losses (the ring in :mod:`llm2clip_fast.ops.global_batch_ring`):
  :func:`gather_batch_sizes`, :func:`all_gather_rows`, :func:`reduce_scatter_rows`,
  :func:`logsumexp_across_ranks`, and :func:`gather_rows_with_grad` (all-gather forward,
  reduce-scatter backward) for losses that gather keys with their gradient.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_rows",
    "average_gradients",
    "barrier",
    "check_collective_device",
    "collective_threads",
    "destroy_distributed",
    "gather_batch_sizes",
    "gather_rows_with_grad",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed_from_env",
    "is_distributed",
    "is_main_process",
    "logsumexp_across_ranks",
    "mean_over_ranks",
    "reduce_scatter_rows",
    "resolve_device",
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


_DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda)(:\d+)?$")


def resolve_device(spec: str | None, *, flag: str = "--device") -> torch.device:
    """The torch device a ``--device`` value names.

    ``auto`` (or None): this rank's GPU (``cuda:LOCAL_RANK`` under torchrun, ``cuda:0`` alone) when CUDA
    is available, else the CPU. ``cpu``. ``cuda``: this rank's GPU. ``cuda:N``: that GPU. Raises
    ValueError naming ``flag`` for any other value, or when CUDA is asked for but absent (or N is not a
    visible device).
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    match = _DEVICE_SPEC.match(text)
    if match is None or (match.group(1) != "cuda" and match.group(2)):
        raise ValueError(f"{flag} must be auto, cpu, cuda or cuda:N, got {spec!r}")
    kind = match.group(1)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        kind = "cuda"
    if not torch.cuda.is_available():
        raise ValueError(f"{flag} {spec} asked for, but no CUDA device is available (use {flag} cpu or auto)")
    # Under torchrun each rank drives its own GPU, not all of them cuda:0.
    index = int(match.group(2)[1:]) if match.group(2) else get_local_rank()
    if index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {spec}: GPU {index} asked for, but {torch.cuda.device_count()} CUDA "
                         "device(s) are visible")
    return torch.device("cuda", index)


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
    _import_group_capturing_modules()
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


def check_collective_device(
    device: torch.device | str, group: dist.ProcessGroup | None = None, *, require_current: bool = True
) -> None:
    """Raise ``ValueError`` unless ``group`` (default group when ``None``) can exchange tensors on ``device``.

    Every tensor a trainer hands to a collective lives on the trainer's device (the distributed
    losses: on the features' device), so that device must be one the group serves: NCCL exchanges
    CUDA tensors only, gloo CPU ones (and CUDA where built so). A group bound to a device at
    initialisation (``device_id``) serves that device only. With ``require_current`` (for trainers)
    a CUDA device must also be this rank's current CUDA device: NCCL's barrier and the object
    collectives (``all_gather_object``) stage their tensors there, so a rank on ``cuda:1`` whose
    current device is ``cuda:0`` would mix two GPUs in one communicator. Tensor collectives alone
    (the losses) follow their tensors' device and pass ``False``. Does nothing when not distributed.
    """
    if not is_distributed():
        return
    device = torch.device(device)
    pg = group or dist.group.WORLD
    served = sorted({d.type for d in getattr(pg, "_device_types", [])})
    where = f"collectives would get tensors on {device}, but"
    if served and device.type not in served:
        raise ValueError(
            f"{where} the process group's backend {dist.get_backend(group)!r} exchanges only "
            f"{' and '.join(served)} tensors; run on {served[0]} or initialise the process group with a "
            f"backend for {device.type} (gloo for cpu, nccl for cuda)"
        )
    bound = getattr(pg, "bound_device_id", None)
    if bound is not None and bound != device:
        raise ValueError(f"{where} the process group was bound to {bound} at initialisation "
                         "(init_process_group(device_id=...)); run each rank on its bound device")
    if require_current and device.type == "cuda":
        current = torch.cuda.current_device()
        if device.index != current:
            wanted = device.index if device.index is not None else "LOCAL_RANK"
            raise ValueError(f"{where} this rank's current CUDA device is cuda:{current}; call "
                             f"torch.cuda.set_device({wanted}) before the first collective "
                             "(NCCL binds each rank to one GPU)")


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait until every rank of ``group`` reaches this point; no-op when not distributed."""
    if is_distributed():
        dist.barrier(group)


def _import_group_capturing_modules() -> None:
    """Import, before the default process group exists, the torch modules that bind it at import time.

    ``torch.distributed.nn.functional`` declares ``def all_gather(tensor, group=group.WORLD)`` and the
    like: imported after ``init_process_group`` (DDP's constructor imports it), those defaults hold the
    default group for the life of the process, so ``destroy_process_group`` cannot free it and gloo's
    worker threads outlive the run into interpreter shutdown (see :func:`destroy_distributed`).
    Imported first, the defaults are None (the group is looked up per call)."""
    import torch.distributed.nn
    import torch.nn.parallel  # noqa: F401


# The native threads a live process group runs (gloo's work loop and transport, the store's server);
# Linux thread names, as /proc/self/task/*/comm gives them.
_COLLECTIVE_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv")


def _collective_tasks() -> dict[str, str]:
    """``{thread id: name}`` of the process group's native threads in this process (Linux; {} elsewhere)."""
    found = {}
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as f:
                name = f.read().strip()
        except OSError:
            continue  # the thread ended while we looked
        if name in _COLLECTIVE_THREAD_NAMES:
            found[task] = name
    return found


def collective_threads() -> list[str]:
    """Names of the process group's native threads still running in this process (Linux; [] elsewhere)."""
    return sorted(_collective_tasks().values())


def _task_activity(task: str) -> tuple[str, str] | None:
    """(scheduler state, context switches so far) of one of this process's threads; None once gone."""
    try:
        with open(f"/proc/self/task/{task}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/self/task/{task}/status", encoding="ascii", errors="replace") as f:
            switches = "/".join(line.split()[1] for line in f if "ctxt_switches" in line)
    except (OSError, IndexError):
        return None
    return state, switches


def wait_for_idle_collective_threads(timeout_s: float = 2.0, quiet_s: float = 0.02) -> bool:
    """Wait (at most ``timeout_s``) until the gloo worker threads of a process group that could not be
    freed are idle: asleep, and not woken once during ``quiet_s`` in which this thread sleeps too.

    This thread sleeps with the GIL released, so a worker that must take the GIL to free a finished
    collective's tensors gets it and is seen running; a worker still asleep after a quiet interval
    waits for work that will not come. Returns whether they were seen idle (True when none exists)."""
    deadline = time.monotonic() + timeout_s
    before = {t: _task_activity(t) for t, n in _collective_tasks().items() if n == "pt_gloo_runloop"}
    while before:
        time.sleep(quiet_s)
        after = {t: _task_activity(t) for t in before}
        if all(a is None or (a == b and a[0] == "S") for a, b in ((after[t], before[t]) for t in before)):
            return True
        if time.monotonic() > deadline:
            return False
        before = after
    return True


def _clear_dtensor_caches() -> None:
    """Empty DTensor's module-level caches (FSDP2 fills them): sharding propagation, redistribution
    planners and their transform plans are keyed by tensor specs, which hold device meshes, which hold
    the process group past the model's life. Each is cleared where this torch has it."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    import importlib

    for module, name in (("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
                         ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
                         ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear")):
        try:
            target: Any = importlib.import_module(module)
            for part in name.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError):  # not in this torch: the group may outlive the run (logged)
            continue
        target()


def destroy_distributed(*, sync: bool = False) -> list[str]:
    """Tear down the default process group if one exists (safe to call more than once); returns the
    names of collective threads still running afterwards (:func:`collective_threads`; [] when the group
    was freed).

    ``sync``: first wait at a barrier until every rank is done with its collectives (a clean end;
    never after a failure, when some rank may never come).

    Why more than ``destroy_process_group``: a gloo worker thread frees a finished collective's tensors
    after the rank has moved on, and a barrier keeps the collectives it followed alive until the
    barrier itself is freed. When those tensors belong to Python objects, freeing them takes the GIL;
    a thread that asks for it while the interpreter shuts down is ended by Python 3.11 with
    ``pthread_exit``, which unwinds through a ``noexcept`` C++ destructor: ``std::terminate``,
    "terminate called without an active exception", SIGABRT after the run's last line. So the group
    must be freed here, before shutdown: cycles that hold a model wrapper (DDP, FSDP: they hold the
    group) are collected first, and the group's last reference dropped then joins gloo's threads
    (torch releases the GIL for that join). The caller must not hold such a wrapper any more. Where
    something else still holds the group (a torch cache this code does not know), its threads are
    waited for until idle (:func:`wait_for_idle_collective_threads`) and returned.
    """
    if not is_distributed():
        return []
    if sync:
        dist.barrier()
    _clear_dtensor_caches()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()
    left = collective_threads()
    if left:
        # Something still holds the group (a torch cache we do not know of): its threads live on, so
        # at least let them finish what they were doing while the interpreter can still serve them.
        wait_for_idle_collective_threads()
    return left


def mean_over_ranks(value: float, device: torch.device, group: dist.ProcessGroup | None = None) -> float:
    """The mean of a Python float over the ranks (``value`` itself without a process group).

    ``device``: where the reduction tensor lives (the backend's device: CUDA for NCCL, CPU for gloo).
    """
    if get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return float(t) / get_world_size(group)


def average_gradients(params: list[torch.nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Replace each gradient by its mean over the ranks, in place (replicated parameters, no DDP
    wrapper). A parameter without a gradient gets zeros first, so every rank joins every reduction."""
    if get_world_size(group) == 1:
        return
    world = get_world_size(group)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)  # SUM: gloo has no AVG
        p.grad.div_(world)


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


# ---------------------------------------------------------------------------------------------
# Row collectives of the global-batch losses.
#
# Every rank passes its local (B_r, D) image and text features (row i of one pairs with row i of
# the other). The global batch is the concatenation over ranks in rank order, so rank r's rows sit
# at global positions offset_r .. offset_r + B_r - 1 with offset_r = B_0 + ... + B_{r-1}. Texts are
# all-gathered (O(B_global * D) per rank); each rank then works on its local-rows x global-columns
# block through the fused primitives, never holding that block (let alone B_global^2) in memory.


def gather_batch_sizes(n_local: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's local batch size, in rank order (one tiny all_gather)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([n_local], device=device, dtype=torch.int64)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def all_gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (sizes[r] rows each) in rank order; no autograd."""
    x = x.detach().contiguous()
    if len(set(sizes)) == 1:
        out = torch.empty((sum(sizes), *x.shape[1:]), device=x.device, dtype=x.dtype)
        dist.all_gather(list(out.split(sizes)), x, group=group)
        return out
    # Collectives want equal-sized pieces: pad each rank's rows to the largest, then drop the padding.
    biggest = max(sizes)
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])


def _collective_unsupported(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, NotImplementedError) or "not support" in msg or "unsupported" in msg


def reduce_scatter_rows(
    full: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Sum ``full`` (sum(sizes), ...) over ranks; return only this rank's slice of rows.

    Each rank receives just its own rows (reduce-scatter), never the whole summed tensor.
    """
    rank = dist.get_rank(group)
    full = full.contiguous()
    pieces = list(full.split(sizes))
    out = torch.empty_like(pieces[rank])
    try:
        dist.reduce_scatter(out, pieces, group=group)
        return out
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        # Some torch versions' gloo has no reduce_scatter for CPU tensors. The refusal is raised
        # locally before any communication and identically on every rank (same backend), so all
        # ranks take this path together: one reduce per owner, each owner receiving its rows.
        if not _collective_unsupported(exc):
            raise
    for owner, piece in enumerate(pieces):
        piece = piece.clone()  # reduce may overwrite the input on non-destination ranks
        dst = dist.get_global_rank(group, owner) if group is not None else owner
        dist.reduce(piece, dst=dst, group=group)
        if owner == rank:
            out = piece
    return out


class _GatherRowsWithGrad(torch.autograd.Function):
    """All ranks' rows in rank order; the backward sums each row's gradient over ranks and hands it
    to the row's owner (reduce-scatter). Replaces ``torch.distributed.nn.functional.all_gather``,
    which is deprecated and whose worker processes sometimes aborted at exit under gloo
    ("terminate called without an active exception")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return reduce_scatter_rows(grad, ctx.sizes, ctx.group), None, None


def gather_rows_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, *, equal_sizes_for: str | None = None
) -> tuple[torch.Tensor, int]:
    """Every rank's ``x`` (B_r, ...) concatenated in rank order, gradients flowing back to each row's
    owner, and this rank's first row in the result.

    ``equal_sizes_for`` names a caller that needs the same B on every rank; unequal sizes then raise
    a RuntimeError naming it. Tensors must be on the process group's device (NCCL: CUDA).
    """
    sizes = gather_batch_sizes(x.shape[0], x.device, group)
    if equal_sizes_for is not None and len(set(sizes)) > 1:
        raise RuntimeError(f"{equal_sizes_for} across ranks needs equal local batches, got {sizes}")
    rows = _GatherRowsWithGrad.apply(x, sizes, group)
    return rows, sum(sizes[: dist.get_rank(group)])


def logsumexp_across_ranks(partial_lse: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Combine per-rank log-sum-exps of disjoint row sets: two O(N) all_reduces, max then sum."""
    peak = partial_lse.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(partial_lse - peak)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return peak + torch.log(total)
