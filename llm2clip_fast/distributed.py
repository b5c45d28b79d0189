"""torch.distributed helpers and the global-batch contrastive losses.

- Process set-up from torchrun's environment, rank queries, barrier, sharding. These answer as a
  single process would when torch.distributed is unavailable or not initialised, so training code
  can call them unconditionally.
- :func:`check_collective_device`: the rule for every tensor handed to a collective. It must live on
  the device the trainer runs on, and that device must be one the process group exchanges (NCCL:
  this rank's CUDA device only). Trainers check their device once after set-up and then build every
  collective's tensors on it (``device=``), never on the default (CPU) device.
- :func:`clip_loss_global`, :func:`siglip_loss_global`: the CLIP and SigLIP losses over the
  global batch of all ranks, from each rank's local features, with O(B_global * D) memory per rank.
  They stay outside torch.compile graphs (``torch.compiler.disable``): they gather batch sizes to
  the host and run collectives inside autograd Functions, which Dynamo cannot trace (it fails hard on
  the process group object rather than breaking the graph). A compiled model that calls them gets a
  graph break there; ``fullgraph=True`` refuses. The local losses compile without graph breaks.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .ops.loss_inputs import check_bias, check_pair, check_scale

__all__ = [
    "barrier",
    "check_collective_device",
    "clip_loss_global",
    "destroy_distributed",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed_from_env",
    "is_distributed",
    "is_main_process",
    "shard_indices",
    "siglip_loss_global",
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


def destroy_distributed() -> None:
    """Tear down the default process group if one exists (safe to call more than once)."""
    if is_distributed():
        dist.destroy_process_group()


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
# Global-batch contrastive losses.
#
# Every rank passes its local (B_r, D) image and text features (row i of one pairs with row i of
# the other). The global batch is the concatenation over ranks in rank order, so rank r's rows sit
# at global positions offset_r .. offset_r + B_r - 1 with offset_r = B_0 + ... + B_{r-1}. Texts are
# all-gathered (O(B_global * D) per rank); each rank then works on its local-rows x global-columns
# block through the fused primitives, never holding that block (let alone B_global^2) in memory.


def _gather_batch_sizes(n_local: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's local batch size, in rank order (one tiny all_gather)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([n_local], device=device, dtype=torch.int64)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
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


def _reduce_scatter_rows(
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
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _reduce_scatter_rows(grad, ctx.sizes, ctx.group), None, None


def gather_rows_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, *, equal_sizes_for: str | None = None
) -> tuple[torch.Tensor, int]:
    """Every rank's ``x`` (B_r, ...) concatenated in rank order, gradients flowing back to each row's
    owner, and this rank's first row in the result.

    ``equal_sizes_for`` names a caller that needs the same B on every rank; unequal sizes then raise
    a RuntimeError naming it. Tensors must be on the process group's device (NCCL: CUDA).
    """
    sizes = _gather_batch_sizes(x.shape[0], x.device, group)
    if equal_sizes_for is not None and len(set(sizes)) > 1:
        raise RuntimeError(f"{equal_sizes_for} across ranks needs equal local batches, got {sizes}")
    rows = _GatherRowsWithGrad.apply(x, sizes, group)
    return rows, sum(sizes[: dist.get_rank(group)])


def _logsumexp_across_ranks(partial_lse: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Combine per-rank log-sum-exps of disjoint row sets: two O(N) all_reduces, max then sum."""
    peak = partial_lse.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(partial_lse - peak)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return peak + torch.log(total)


def _require_process_group() -> None:
    if not is_distributed():
        raise RuntimeError(
            "a distributed loss was requested (distributed=True or a process_group) but torch.distributed "
            "is not initialised; call init_distributed_from_env() first (or drop distributed=True)"
        )


def _local_row_weights(grad_out: torch.Tensor, reduction: str, m: int) -> torch.Tensor:
    """Per-row upstream gradient of a reduced loss, as an (m,) vector."""
    if reduction == "mean":
        return (grad_out.reshape(()) / m).expand(m)
    if reduction == "sum":
        return grad_out.reshape(()).expand(m)
    return grad_out


class _ClipLossGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, reduction, backend, group, sizes):  # type: ignore[override]
        from .ops.clip_loss import clip_lse_forward

        rank = dist.get_rank(group)
        offset = sum(sizes[:rank])
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        s = scale.detach().to(acc)
        text_all = _all_gather_rows(text, sizes, group)
        row_lse, col_lse_part = clip_lse_forward(image, text_all, s, backend=backend)
        col_lse = _logsumexp_across_ranks(col_lse_part, group)
        diag = torch.einsum("bd,bd->b", image.to(acc), text.to(acc))
        per_sample = 0.5 * (row_lse + col_lse[offset: offset + image.shape[0]]) - s * diag
        ctx.save_for_backward(image, text, text_all, s, row_lse, col_lse, diag)
        ctx.reduction, ctx.backend, ctx.group, ctx.sizes = reduction, backend, group, sizes
        ctx.scale_dtype = scale.dtype
        if reduction == "mean":
            return per_sample.mean()
        return per_sample.sum() if reduction == "sum" else per_sample

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        from .ops.clip_loss import clip_lse_backward

        image, text, text_all, s, row_lse, col_lse, diag = ctx.saved_tensors
        group, sizes = ctx.group, ctx.sizes
        g = _local_row_weights(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
        coef = 0.5 * g
        # Text j's term (its column LSE) belongs to the rank owning text j, with that rank's upstream
        # gradient: the column coefficients are every rank's row coefficients, gathered.
        col_coef = _all_gather_rows(coef, sizes, group)
        d_image, d_text_all, d_scale = clip_lse_backward(
            image, text_all, s, row_lse, col_lse, coef, col_coef, backend=ctx.backend
        )
        d_text = _reduce_scatter_rows(d_text_all, sizes, group)
        del d_text_all
        gs = (g * s)[:, None]
        d_image = d_image - gs * text.to(s.dtype)
        d_text = d_text - gs * image.to(s.dtype)
        d_scale = d_scale - (g * diag).sum()
        # The blocks of all ranks together give d(sum_r L_r)/d(scale); each rank returns the rank
        # average, which is what gradient averaging (DDP) makes of OpenCLIP's per-rank values.
        dist.all_reduce(d_scale, group=group)
        d_scale = d_scale / dist.get_world_size(group)
        need = ctx.needs_input_grad
        return (
            d_image.to(image.dtype) if need[0] else None,
            d_text.to(text.dtype) if need[1] else None,
            d_scale.to(ctx.scale_dtype) if need[2] else None,
            None, None, None, None,
        )


# Collectives and host-side batch sizes: eager only (module docstring).
@torch.compiler.disable
def clip_loss_global(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    reduction: str = "mean",
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Symmetric CLIP loss over the global batch of all ranks, from each rank's local features.

    Convention (equal to OpenCLIP's ``ClipLoss(local_loss=True, gather_with_grad=True)`` on the
    same shards). Global batch = concatenation of the ranks' batches in rank order; rank r holds
    rows ``offset_r .. offset_r + B_r - 1``. Rank r's loss is
    ``L_r = mean_{i in r} (CE_i(image_i vs all texts) + CE_i(text_i vs all images)) / 2``
    ('sum': the sum, 'none': the (B_r,) per-sample values). Backward is collective (every rank
    must call it) and gives
    - image/text features of rank r: ``d(sum_q g_q * L_q) / d(features_r)`` where g_q is rank q's
      upstream gradient: exactly OpenCLIP's gradients (they flow back through the gather), and
      with equal B_r and g_q = 1, W times the gradient of the single-process loss on the
      concatenated batch; DDP's averaging turns them into that gradient;
    - logit_scale: ``(1/W) * d(sum_q g_q * L_q) / d(scale)`` on every rank: the rank average of
      OpenCLIP's per-rank gradients, i.e. identical after DDP averages the parameter's gradient
      (the per-rank split would need a second pass over the tiles).

    Work and memory per rank: one forward pass over the (B_r x B_global) similarity tiles giving
    row LSEs locally and column-LSE partials that are combined across ranks with two O(B_global)
    all_reduces; a backward that recomputes the tiles once and returns text gradients to their owner
    ranks with a reduce-scatter. Memory O(B_global * D); the B_r x B_global matrix is never held.
    Unequal local batch sizes are supported. Works on any torch.distributed backend (NCCL, gloo).
    Not initialised: raises RuntimeError.
    """

    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    _require_process_group()
    check_pair(image_features, text_features, "image_features", "text_features", same_batch=True)
    # The collectives below take tensors on the features' device: say so before NCCL does.
    check_collective_device(image_features.device, process_group, require_current=False)
    if image_features.dtype != text_features.dtype:
        common = torch.promote_types(image_features.dtype, text_features.dtype)
        image_features, text_features = image_features.to(common), text_features.to(common)
    scale = check_scale(logit_scale, image_features.device)
    sizes = _gather_batch_sizes(image_features.shape[0], image_features.device, process_group)
    if min(sizes) == 0:
        raise ValueError(f"every rank needs a non-empty local batch; local batch sizes are {sizes}")
    return _ClipLossGlobal.apply(image_features.contiguous(), text_features.contiguous(), scale, reduction,
                                 backend, process_group, sizes)


class _SigLipLossGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, reduction, backend, group, sizes):  # type: ignore[override]
        from .ops.siglip_loss import siglip_forward_rows

        rank = dist.get_rank(group)
        offset = sum(sizes[:rank])
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        s = scale.detach().to(acc)
        b = bias.detach().to(acc)
        text_all = _all_gather_rows(text, sizes, group)
        rows = siglip_forward_rows(image, text_all, s, b, offset=offset, backend=backend)
        ctx.save_for_backward(image, text_all, s, b)
        ctx.reduction, ctx.backend, ctx.group, ctx.sizes = reduction, backend, group, sizes
        ctx.offset = offset
        ctx.param_dtypes = (scale.dtype, bias.dtype)
        if reduction == "mean":
            return rows.sum() / image.shape[0]
        return rows.sum() if reduction == "sum" else rows

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        from .ops.siglip_loss import row_weights_for, siglip_backward

        image, text_all, s, b = ctx.saved_tensors
        weight = row_weights_for(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
        d_image, d_text_all, d_scale, d_bias = siglip_backward(
            image, text_all, s, b, weight, offset=ctx.offset, backend=ctx.backend
        )
        d_text = _reduce_scatter_rows(d_text_all, ctx.sizes, ctx.group)
        need = ctx.needs_input_grad
        return (
            d_image.to(image.dtype) if need[0] else None,
            d_text.to(image.dtype) if need[1] else None,
            d_scale.to(ctx.param_dtypes[0]) if need[2] else None,
            d_bias.to(ctx.param_dtypes[1]) if need[3] else None,
            None, None, None, None,
        )


# Collectives and host-side batch sizes: eager only (module docstring).
@torch.compiler.disable
def siglip_loss_global(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    reduction: str = "mean",
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """SigLIP loss of each rank's images against the texts of all ranks (OpenCLIP ``SigLipLoss``).

    Convention (equal to OpenCLIP's ``SigLipLoss(rank, world_size)`` with or without
    ``bidir``, on the same shards). Global batch = concatenation of the ranks' batches in rank
    order; rank r's images are positives with their own texts only. Rank r's loss is
    ``L_r = sum_{i in r, all j} softplus(-y_ij * (s * <image_i, text_j> + b)) / B_r``
    ('sum': without the division, 'none': the (B_r,) per-image row sums). Backward is collective
    (every rank must call it) and gives
    - image features of rank r: ``g_r * dL_r / d(image_r)``;
    - text features of rank r: ``d(sum_q g_q * L_q) / d(text_r)`` (every rank's images saw them),
      returned to the owner by a reduce-scatter;
    - logit_scale, logit_bias: ``g_r * dL_r / d(.)``, rank r's own gradient, exactly as OpenCLIP.
    (g_q is rank q's upstream gradient.) These are OpenCLIP's gradients, which its ring exchange
    routes back to the owners the same way.

    Per rank: texts all-gathered (O(B_global * D)); one forward pass over the B_r x B_global tiles,
    one recomputing backward; the block itself is never held. Unequal local batch sizes are
    supported. Any torch.distributed backend (NCCL, gloo). Not initialised: raises RuntimeError.
    """

    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    _require_process_group()
    check_pair(image_features, text_features, "image_features", "text_features", same_batch=True)
    # The collectives below take tensors on the features' device: say so before NCCL does.
    check_collective_device(image_features.device, process_group, require_current=False)
    if image_features.dtype != text_features.dtype:
        common = torch.promote_types(image_features.dtype, text_features.dtype)
        image_features, text_features = image_features.to(common), text_features.to(common)
    scale = check_scale(logit_scale, image_features.device)
    bias = check_bias(logit_bias, image_features.device)
    sizes = _gather_batch_sizes(image_features.shape[0], image_features.device, process_group)
    if min(sizes) == 0:
        raise ValueError(f"every rank needs a non-empty local batch; local batch sizes are {sizes}")
    return _SigLipLossGlobal.apply(image_features.contiguous(), text_features.contiguous(), scale, bias,
                                   reduction, backend, process_group, sizes)
